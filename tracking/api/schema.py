"""OpenAPI for the two endpoints DRF does not serve: telemetry ingest and the OTLP receiver.

``POST /api/v1/events`` and the OTLP paths are answered by the ASGI fast path
(``tracking/api/fastpath.py``) or plain Django views, so drf-spectacular does not
see them. This postprocessing hook adds them to the schema, the event's schema
taken from the msgspec struct that validates it (``tracking.protocol.EventV1``),
so the documentation cannot drift from what is checked.
"""

from __future__ import annotations

from typing import Any

import msgspec
from django.conf import settings

from sagaadmin.problems import PROBLEM_CONTENT_TYPE
from tracking.protocol import EventV1

_PROBLEM = {"$ref": "#/components/schemas/Problem"}


def _problem(text: str) -> dict[str, Any]:
    return {"description": text, "content": {PROBLEM_CONTENT_TYPE: {"schema": _PROBLEM}}}


def _ingest_answer() -> dict[str, Any]:
    result = {
        "type": "object",
        "required": ["index", "id", "status"],
        "properties": {
            "index": {"type": "integer", "description": "the event's place in the request"},
            "id": {"type": "string", "nullable": True},
            "status": {"type": "string", "enum": ["accepted", "duplicate", "rejected"]},
            "errors": {
                "type": "array",
                "description": "rejected: the first error, naming the field",
                "items": {"$ref": "#/components/schemas/ProblemFieldError"},
            },
            "warnings": {"type": "array", "items": {"type": "string"}},
        },
    }
    return {
        "type": "object",
        "required": ["accepted", "duplicates", "rejected", "results"],
        "properties": {
            "accepted": {"type": "integer"},
            "duplicates": {"type": "integer"},
            "rejected": {"type": "integer"},
            "results": {"type": "array", "items": result},
        },
    }


def _openapi30(node: Any) -> Any:
    """JSON Schema (msgspec's) to OpenAPI 3.0: ``anyOf [X, {"type": "null"}]`` becomes X
    with ``nullable: true`` (3.0 has no null type), ``const`` a one-value ``enum``, and
    ``propertyNames`` (not in 3.0) a sentence of the description."""
    if isinstance(node, list):
        return [_openapi30(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _openapi30(value) for key, value in node.items()}
    if isinstance(names := node.pop("propertyNames", None), dict) and "maxLength" in names:
        node["description"] = (
            node.get("description", "") + f" Keys: at most {names['maxLength']} characters."
        ).strip()
    if node.get("required") == []:  # 3.0 wants it absent rather than empty
        del node["required"]
    if "const" in node:
        node["enum"] = [node.pop("const")]
    choices = node.get("anyOf")
    if isinstance(choices, list) and {"type": "null"} in choices:
        rest = [c for c in choices if c != {"type": "null"}]
        del node["anyOf"]
        if len(rest) == 1 and "$ref" in rest[0]:
            node["allOf"] = rest  # siblings of a $ref are ignored in 3.0
        elif len(rest) == 1:
            node.update(rest[0])
        else:
            node["anyOf"] = rest
        node["nullable"] = True
    return node


def ingest_paths(result: dict[str, Any], generator: Any, request: Any, public: bool) -> Any:
    """drf-spectacular ``POSTPROCESSING_HOOKS`` entry: document the ingest endpoints."""
    _, components = msgspec.json.schema_components(
        [EventV1], ref_template="#/components/schemas/{name}"
    )
    components = _openapi30(components)
    schemas = result.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(components)
    schemas["IngestAnswer"] = _ingest_answer()
    security = result["components"].setdefault("securitySchemes", {})
    security["ServiceKey"] = {
        "type": "http",
        "scheme": "bearer",
        "description": "a service key (manage.py create_service_key, or the Services page)",
    }
    most_events = settings.SAGAADMIN["INGEST_MAX_EVENTS"]
    most_bytes = settings.SAGAADMIN["INGEST_MAX_BODY_BYTES"]
    event = {"$ref": "#/components/schemas/EventV1"}
    batch = {
        "type": "object",
        "required": ["events"],
        "additionalProperties": False,
        "properties": {"events": {"type": "array", "items": event, "maxItems": most_events}},
    }
    errors = {
        "400": _problem("the body is not JSON (or not UTF-8), or not an event or a batch"),
        "401": _problem("no key, or a revoked or unknown one"),
        "413": _problem(f"more than {most_bytes:,} bytes, or more than {most_events:,} events"),
        "415": _problem("not application/json"),
        "429": _problem("ingest is behind: retry after Retry-After seconds; nothing stored"),
        "503": _problem("the database is unreachable: retry after Retry-After seconds"),
    }
    paths = result.setdefault("paths", {})
    paths["/api/v1/events"] = {
        "post": {
            "operationId": "events_report",
            "summary": f"Report saga telemetry: one event, or a batch of up to {most_events:,}",
            "description": (
                "Protocol version 1 (docs/protocol.md: every field, every event type, the "
                "error table). Each event is accepted, a duplicate (same service and id, "
                "same content) or rejected naming its field; one bad event never drops "
                "the others. A request of one rejected event answers 422."
            ),
            "tags": ["events"],
            "security": [{"ServiceKey": []}],
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"oneOf": [event, batch]}}},
            },
            "responses": {
                "200": {
                    "description": "each event's outcome, in request order",
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/IngestAnswer"}
                        }
                    },
                },
                "422": _problem("the request's only event was rejected (errors name the field)"),
                **errors,
            },
        }
    }
    # OTLP/HTTP answers errors as a google.rpc.Status in the request's encoding
    status = {
        "application/json": {"schema": {"type": "object"}},
        "application/x-protobuf": {"schema": {"type": "string", "format": "binary"}},
    }
    otlp_413 = (
        f"more than {most_bytes:,} bytes as sent, more than "
        f"{settings.SAGAADMIN['OTLP_MAX_BYTES']:,} decompressed, or more than "
        f"{settings.SAGAADMIN['OTLP_MAX_SPANS']:,} spans"
    )
    otlp_errors = {
        code: {
            "description": (otlp_413 if code == "413" else answer["description"])
            + " (a google.rpc.Status)",
            "content": status,
        }
        for code, answer in errors.items()
    }
    otlp: dict[str, dict[str, Any]] = {
        "post": {
            "operationId": "otlp_traces_export",
            "summary": "Receive OpenTelemetry traces (OTLP/HTTP) as saga telemetry",
            "description": (
                "An OTLP/HTTP ExportTraceServiceRequest, protobuf or JSON, optionally "
                "gzip-encoded; spans carrying saga attributes become events "
                "(docs/opentelemetry.md). The answer is an ExportTraceServiceResponse "
                "in the request's encoding, with partial_success for spans it refused."
            ),
            "tags": ["events"],
            "security": [{"ServiceKey": []}],
            "requestBody": {
                "required": True,
                "content": {
                    "application/x-protobuf": {"schema": {"type": "string", "format": "binary"}},
                    "application/json": {"schema": {"type": "object"}},
                },
            },
            "responses": {
                "200": {
                    "description": "ExportTraceServiceResponse",
                    "content": {
                        "application/x-protobuf": {
                            "schema": {"type": "string", "format": "binary"}
                        },
                        "application/json": {"schema": {"type": "object"}},
                    },
                },
                **otlp_errors,
            },
        }
    }
    paths["/api/v1/otlp/v1/traces"] = otlp
    paths["/v1/traces"] = {
        "post": {
            **otlp["post"],
            "operationId": "otlp_traces_export_root",
            "summary": "Receive OpenTelemetry traces at the path a standard exporter appends "
            "to its base URL (the same as /api/v1/otlp/v1/traces)",
        }
    }
    return result
