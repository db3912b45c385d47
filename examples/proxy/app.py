"""A tiny web application that keeps its data in SQLite on a LiteFS mount.

It knows nothing of LiteFS or of which node is the primary: it reads and
writes its database as if it were alone, and the LiteFS proxy in front of it
sends its writes to the primary. Standard library only.

    python app.py --db /litefs/app.db --port 8081 --name node1

    POST /items      stores the request body as a new item; 201 {"id": N}
    GET  /items      every item, oldest first: [{"id": N, "body": "...", "node": "..."}]

Every answer names the node that served it in an X-Served-By header.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SCHEMA = "CREATE TABLE IF NOT EXISTS items (id INTEGER PRIMARY KEY, body TEXT, node TEXT)"


class App(BaseHTTPRequestHandler):
    db = ""
    name = ""
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # the headers and the body go out as separate writes

    def do_GET(self) -> None:
        if self.path != "/items":
            return self.answer(404, {"error": "not found"})
        try:
            conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=5)
        except sqlite3.OperationalError:
            return self.answer(200, [])  # no write has reached this node yet
        try:
            rows = conn.execute("SELECT id, body, node FROM items ORDER BY id").fetchall()
        except sqlite3.OperationalError:
            rows = []  # the table does not exist yet
        finally:
            conn.close()
        self.answer(200, [{"id": i, "body": body, "node": node} for i, body, node in rows])

    def do_POST(self) -> None:
        if self.path != "/items":
            return self.answer(404, {"error": "not found"})
        body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
        conn = sqlite3.connect(self.db, timeout=5, isolation_level=None)
        try:
            conn.execute(SCHEMA)
            cursor = conn.execute("INSERT INTO items (body, node) VALUES (?, ?)", (body, self.name))
            self.answer(201, {"id": cursor.lastrowid})
        except sqlite3.Error as exc:
            self.answer(500, {"error": str(exc)})
        finally:
            conn.close()

    def answer(self, status: int, value: object) -> None:
        data = json.dumps(value).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Served-By", self.name)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", required=True, help="the database file in the LiteFS mount")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--name", default="app", help="names this node in X-Served-By")
    args = parser.parse_args()
    App.db, App.name = args.db, args.name
    ThreadingHTTPServer((args.host, args.port), App).serve_forever()


if __name__ == "__main__":
    main()
