def handle_ping(data):
    return {"message": "not the real ping"}
