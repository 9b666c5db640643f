"""End-to-end Keras models: layers, sklearn-to-Keras conversion, the rebuilt model, fine-tuning, runners."""
