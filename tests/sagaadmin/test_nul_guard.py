"""A NUL character anywhere in a request is a 400 naming where, never a database error."""

from __future__ import annotations

import json

import pytest
from django.test import Client

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize(
    ("url", "field"),
    [
        ("/api/v1/sagas/a%00b", "path"),
        ("/api/v1/sagas/a%00b/events", "path"),
        ("/api/v1/incidents?saga_id=x%00", "saga_id"),
        ("/api/v1/sagas?saga_id=ord%00", "saga_id"),
        ("/api/v1/saga-types/%00", "path"),
    ],
)
def test_a_nul_in_an_api_path_or_query_is_a_400_problem(user_client, url, field) -> None:
    response = user_client.get(url)
    assert response.status_code == 400
    assert response["Content-Type"] == "application/problem+json"
    assert [e["field"] for e in response.json()["errors"]] == [field]


def test_a_nul_in_a_json_body_is_named_by_its_path(role_client) -> None:
    operator = role_client("operator")
    body = {"reason": "x", "expected_version": 1, "data": {"items": [{"sku": "a\u0000"}]}}
    response = operator.post(
        "/api/v1/sagas/s-1/actions/retry_step", json.dumps(body), content_type="application/json"
    )
    assert response.status_code == 400
    assert response.json()["errors"][0]["field"] == "data.items[0].sku"
    # an escaped backslash followed by u0000 is ordinary text (the view answers, here 404)
    body = {"reason": "a \\u0000 b", "expected_version": 1}
    response = operator.post(
        "/api/v1/sagas/s-1/actions/retry_step", json.dumps(body), content_type="application/json"
    )
    assert response.status_code == 404


def test_a_nul_in_a_page_query_form_or_cookie_is_a_400(user_client) -> None:
    assert user_client.get("/sagas/?saga_id=x%00").status_code == 400
    assert user_client.get("/sagas/x%00").status_code == 400
    assert user_client.post("/incidents/1/resolve", {"note": "a\x00"}).status_code == 400
    anonymous = Client()
    anonymous.cookies["sessionid"] = "abc\x00def"
    assert anonymous.get("/").status_code == 400
