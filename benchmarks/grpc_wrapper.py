"""The leanest gRPC server around LiteRT that grpcio allows, written as an application
developer would write one to be fast: one unary method, raw tensor bytes in and out (no
protobuf, no checks, no accounting). benchmarks/agent_protocols.py measures it beside the
agent's gRPC front ends in the same run: what it costs is grpcio's own floor (both ends'
HTTP/2, the copies of the frame, the thread hand-off), which no server built on grpcio
gets under.

    python benchmarks/grpc_wrapper.py MODEL.tflite PORT_FILE
"""

import ctypes
import json
import signal
import sys
from concurrent import futures

import grpc
import numpy as np
from ai_edge_litert.interpreter import Interpreter

METHOD = "/wrapper.Model/Infer"

if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    try:  # two malloc arenas, as the agent (daemon.limit_malloc_arenas): the same conditions
        ctypes.CDLL(None).mallopt(-8, 2)
    except (OSError, AttributeError):
        pass
    interpreter = Interpreter(model_path=sys.argv[1], num_threads=1)
    interpreter.allocate_tensors()
    details = interpreter.get_input_details()[0]
    input_index, shape = details["index"], details["shape"]
    output_index = interpreter.get_output_details()[0]["index"]

    def infer(request: bytes, context: object) -> bytes:
        interpreter.set_tensor(input_index, np.frombuffer(request, dtype=np.float32).reshape(shape))
        interpreter.invoke()
        return interpreter.get_tensor(output_index).tobytes()

    handler = grpc.method_handlers_generic_handler(
        "wrapper.Model", {"Infer": grpc.unary_unary_rpc_method_handler(infer)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), handlers=[handler])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with open(sys.argv[2], "w") as handle:
        json.dump({"grpc": port}, handle)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    server.stop(1)
