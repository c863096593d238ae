"""edgeship.agent: the on-device agent (``edgeship-agent``).

Imports only ``edgeship.ota``, the light base and exactly one model runtime:
never TensorFlow (unless it is the device's only TFLite runtime), never the
converters, never the toolkit.
"""
