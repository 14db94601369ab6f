"""The server's request lines (logger ``proxy_serve.requests``) read back from its log file: what each request was
(its shape, logged at debug level) and how it ended (its status). An end-to-end check asks the log, not the client,
whether a frontend's calls were answered: a frontend often hides a failed background task."""

from __future__ import annotations

import re
from dataclasses import dataclass

# "<id> chat keys=messages,model,stream,tools messages=1 tools=36 tool_choice=- prompt_tokens=39"
_SHAPE = re.compile(r"proxy_serve\.requests: (\S+) ((?:chat|completions|responses) keys=.*)$")
# "<id> model=proxy-real status=200 prompt_tokens=39 ..." or "<id> model=unknown status=404 error='...'"
_END = re.compile(r"proxy_serve\.requests: (\S+) model=(\S+) status=(\S+)")
# "refused POST /v1/chat/completions status=400 error='...'": refused before a generation began (key, body, path)
_REFUSED = re.compile(r"proxy_serve\.requests: refused (\S+) (\S+) status=(\d+) (.*)$")


@dataclass
class LoggedRequest:
    request_id: str
    shape: str | None = None  # None unless the server logs at debug level
    model: str | None = None
    status: str | None = None  # None while it runs: "200", "400", "disconnected", ...

    @property
    def tools(self) -> int:
        found = re.search(r" tools=(\d+)", self.shape or "")
        return int(found.group(1)) if found else 0

    @property
    def keys(self) -> list[str]:
        found = re.search(r"keys=(\S*)", self.shape or "")
        return found.group(1).split(",") if found else []


def read_requests(log: str) -> list[LoggedRequest]:
    """The generation requests in ``log``, in the order they arrived."""
    requests: dict[str, LoggedRequest] = {}
    for line in log.splitlines():
        if shape := _SHAPE.search(line):
            requests.setdefault(shape.group(1), LoggedRequest(shape.group(1))).shape = shape.group(2)
        elif end := _END.search(line):
            request = requests.setdefault(end.group(1), LoggedRequest(end.group(1)))
            request.model, request.status = end.group(2), end.group(3)
    return list(requests.values())


def read_refusals(log: str) -> list[str]:
    """Requests refused before any generation began (a bad key, a body that does not validate, no such path)."""
    return [" ".join(found.groups()) for line in log.splitlines() if (found := _REFUSED.search(line))]
