"""edgeship.converters: model in, converted model and report out (TFLite, ONNX, quantization, validation)."""
