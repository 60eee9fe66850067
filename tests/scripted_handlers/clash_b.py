def handle_shared(data):
    return {"from": "b"}
