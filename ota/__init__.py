"""edgeship.ota: everything the host and the device must agree on.

Bundle format, trust (TUF release repository and the director's signed desired
state), golden vectors, the MQTT topic tree and message schemas, block transfer.
Imports only the light base (numpy, cryptography, tuf, paho-mqtt): the device
agent depends on it.
"""
