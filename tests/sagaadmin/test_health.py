from __future__ import annotations

import pytest
from django.db import connection
from django.test import Client

from tests.conftest import database_away


def test_healthz_answers_without_the_database() -> None:
    assert Client().get("/healthz").json() == {"status": "ok"}


@pytest.mark.django_db
def test_readyz_reports_the_database() -> None:
    response = Client().get("/readyz")
    assert response.status_code == 200
    assert response.json()["database"] == connection.vendor


@pytest.mark.django_db(transaction=True)
def test_readyz_is_503_when_the_database_is_away(postgres) -> None:
    with database_away():
        response = Client().get("/readyz")
    assert response.status_code == 503
    assert response["Retry-After"]


def test_unknown_api_paths_are_problem_json() -> None:
    response = Client().get("/api/v1/nothing-here")
    assert response.status_code == 404
    assert response["Content-Type"] == "application/problem+json"
