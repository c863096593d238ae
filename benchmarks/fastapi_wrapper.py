"""A plain FastAPI+uvicorn wrapper around LiteRT, written as an application developer
would write one: what benchmarks/agent_protocols.py compares the agent's TF Serving REST
path with (the same JSON body, the same model, one interpreter thread).

    python benchmarks/fastapi_wrapper.py MODEL.tflite PORT_FILE
"""

import json
import socket
import sys

import numpy as np
import uvicorn
from ai_edge_litert.interpreter import Interpreter
from fastapi import FastAPI, Request

interpreter = Interpreter(model_path=sys.argv[1], num_threads=1)
interpreter.allocate_tensors()
input_index = interpreter.get_input_details()[0]["index"]
output_index = interpreter.get_output_details()[0]["index"]
app = FastAPI()


@app.post("/v1/models/mobilenet:predict")
async def predict(request: Request) -> dict:
    body = await request.json()
    x = np.asarray(body["instances"], dtype=np.float32)
    interpreter.set_tensor(input_index, x)
    interpreter.invoke()
    return {"predictions": interpreter.get_tensor(output_index).tolist()}


if __name__ == "__main__":
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    with open(sys.argv[2], "w") as handle:
        json.dump({"http": sock.getsockname()[1]}, handle)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
