def handle_shared(data):
    return {"from": "a"}


def handle_only_a(data):
    return {}
