"""Issue 31: the demo's cost estimate against the measured time of a request (shipped models, TestClient)."""
import json
import sys
import time

from starlette.testclient import TestClient

from ladic import LaDiC
from ladic.captioner import default_model_path, full_model_path
from ladic.demo import create_app, measure_cost

rows = []
for name, path in (("student", default_model_path()), ("full", full_model_path())):
    model = LaDiC.from_pretrained(path)
    t0 = time.perf_counter()
    cost = measure_cost(model)
    measure_s = time.perf_counter() - t0
    client = TestClient(create_app(model, cost=cost, max_request_seconds=60))
    for params in ({}, {"steps": "5"}, {"steps": "20", "mbr": "4"}, {"steps": "50", "samples": "4"},
                   {"steps": "100", "mbr": "8", "samples": "2"}):
        est = client.get("/api/estimate", params=params).json()["seconds"]
        t0 = time.perf_counter()
        r = client.post("/api/caption", data={"example": "coffee", **params})
        took = time.perf_counter() - t0
        row = {"model": name, "params": params, "estimate_s": est, "took_s": round(took, 3),
               "status": r.status_code, "measure_cost_s": round(measure_s, 2), "cost": cost.__dict__}
        rows.append(row)
        print(json.dumps(row), flush=True)
json.dump(rows, open(sys.argv[1], "w"), indent=1)
