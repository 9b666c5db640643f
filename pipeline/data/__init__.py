"""Images in: sources, decoding, content-hashed splits, preprocessing, the tf.data pipeline, augmentation."""
