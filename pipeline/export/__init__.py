"""A trained model outside Keras: ONNX, LiteRT or a TensorFlow SavedModel (`convert`),
int8 post-training quantization (`quantize`), the runtimes that run each copy
(`runtimes`) and the check that a copy answers as the Keras model does (`agreement`).
`python -m pipeline export` (`pipeline.tools.export`) drives them."""
