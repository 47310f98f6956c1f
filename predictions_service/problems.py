"""Error answers in Replicate's shape: ``application/problem+json`` bodies.

    raise ApiProblem(404, detail="The requested resource could not be found.")
    raise InputInvalid([("input", "required", "image is required")])     # the 422 with invalid_fields

The app turns these exceptions into responses; a model failure is never one of them (it is a
prediction with ``status: "failed"``).
"""

from __future__ import annotations

import json
from http import HTTPStatus

from starlette.responses import Response

NOT_FOUND = "The requested resource could not be found."


class ApiProblem(Exception):
    def __init__(
        self,
        status: int,
        detail: str,
        title: str | None = None,
        headers: dict | None = None,
        extra: dict | None = None,
    ) -> None:
        super().__init__(detail)
        self.status, self.detail, self.title = status, detail, title
        self.headers = headers or {}
        self.extra = extra or {}

    def body(self) -> dict:
        """``{title, detail, status, ...}``: every error has all three (the title defaults to the
        status's reason phrase, e.g. "Not Found", "Too Many Requests")."""
        try:
            phrase = HTTPStatus(self.status).phrase
        except ValueError:
            phrase = "Error"
        out: dict = {"title": self.title or phrase}
        out["detail"] = self.detail
        out["status"] = self.status
        out.update(self.extra)
        return out

    def response(self, more_headers: dict | None = None) -> Response:
        headers = {**self.headers, **(more_headers or {})}
        return Response(
            json.dumps(self.body()),
            status_code=self.status,
            media_type="application/problem+json",
            headers=headers,
        )


class InputInvalid(ApiProblem):
    """422 "Input validation failed": one ``- field: description`` line per problem."""

    def __init__(self, problems: list[tuple[str, str, str]]) -> None:
        lines = "".join(
            f"- {desc}\n" if field == "(root)" else f"- {field}: {desc}\n" for field, _kind, desc in problems
        )
        fields = [{"type": kind, "field": field, "description": desc} for field, kind, desc in problems]
        super().__init__(422, lines, title="Input validation failed", extra={"invalid_fields": fields})


def invalid_version() -> ApiProblem:
    return ApiProblem(
        422,
        "The specified version does not exist (or perhaps you don't have permission to use it?)",
        title="Invalid version or not permitted",
    )
