"""End-to-end Keras models: layers, sklearn-to-Keras conversion, the rebuilt model and its runners."""
