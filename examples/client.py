"""The Python client in a dozen lines: submit the tutorial's example, follow it live, read it back.

Run with the stack up (`gradstream up`) and GRADSTREAM_URL / GRADSTREAM_API_KEY exported:
    .venv/bin/python examples/client.py
"""

from api.client import Client

spec = {
    "data": {"x": [[1.0]], "y": [2.0]},
    "init": {"w": [1.0]},
    "optimizer": {"name": "sgd", "lr": 0.1},
    "steps": 10,
    "device": "cpu",
}

with Client() as client:  # GRADSTREAM_URL and GRADSTREAM_API_KEY from the environment
    job = client.submit(spec)
    for event in client.stream(job["id"]):  # live; resumes by Last-Event-ID if dropped
        if event.event == "step":
            step = event.data
            # params are the values the step started from; grads are dLoss/dparams there
            print(f"step {step['step']}: loss {step['loss']:.6g} w {step['params']['w']}")
    view = client.get(job["id"])
    print(f"{view['status']}: final w {view['result']['params']['w']}")
    print("prediction for x=3:", client.predict(job["id"], [[3.0]]))
    history = list(client.steps(job["id"], after=4))  # `after` is exclusive: steps 5..9
    print("stored steps after 4:", [record["step"] for record in history])
