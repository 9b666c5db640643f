"""From pixels to features: the backbones, and the engines (TensorFlow, TFLite) that run them."""
