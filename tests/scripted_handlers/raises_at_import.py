raise RuntimeError("no config file")
