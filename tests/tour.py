"""What the client tours share: an answer that must parse, and a wait for an operation's end."""
import sys
import time


def parsed(name, response, model):
    """The answer's parsed model; exits naming the call when it is not a success of `model`."""
    if response.status_code >= 300 or not isinstance(response.parsed, model):
        sys.exit(f"{name}: {response.status_code} {type(response.parsed).__name__}: {response.content[:300]!r}")
    print(name, response.status_code, model.__name__)
    return response.parsed


def wait(operation_id, fetch, model):
    """Polls `fetch(operation_id)` (parsed as `model`) until the operation has finished."""
    for _ in range(300):
        operation = parsed("get_operation", fetch(operation_id), model)
        if operation.finished_at:
            return operation
        time.sleep(0.2)
    sys.exit(f"operation {operation_id} did not end")
