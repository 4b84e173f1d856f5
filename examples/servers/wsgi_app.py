"""The smallest WSGI app: every request answers 200 with the pid of the process that answered it
(a gunicorn worker), so that a client can tell which generation served it.

    gunicorn --chdir examples/servers wsgi_app:app
"""

import os


def app(environ, start_response):
    body = f"{os.getpid()}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
