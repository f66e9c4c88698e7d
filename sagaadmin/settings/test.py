"""Test settings: the base settings, changed only where it makes tests fast."""

from .base import *  # noqa: F403

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

# The test process imports the ASGI application long after start-up: freezing then
# would keep the fixtures alive until it exits (tests/sagaadmin/test_gc_tuning.py tests gc_tune).
SAGAADMIN["GC_THRESHOLD"] = None  # noqa: F405
SAGAADMIN["GC_FREEZE"] = False  # noqa: F405
