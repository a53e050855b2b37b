"""A local moto S3 server for the object-storage tests and benchmark."""

from __future__ import annotations

import os
import socket

AWS_VARIABLES = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


def start_moto(bucket: str, key: str = "test") -> tuple[object, dict]:
    """A moto server on a free 127.0.0.1 port with `bucket` made, and the AWS environment (set in
    os.environ) pointing at it; returns the server and that environment."""
    from moto.server import ThreadedMotoServer

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = dict(zip(AWS_VARIABLES, (f"http://127.0.0.1:{port}", key, key, "us-east-1")))
    os.environ.update(env)
    import s3fs

    s3fs.S3FileSystem(use_listings_cache=False, skip_instance_cache=True).mkdir(bucket)
    return server, env
