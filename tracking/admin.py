"""Django admin: services and their keys (keys are created with the secret shown once)."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.http import HttpRequest, HttpResponseRedirect
from django.urls import reverse
from django.utils import timezone

from tracking.keys import service_key_create
from tracking.models import Saga, Service, ServiceKey


class ServiceKeyInline(admin.TabularInline):
    model = ServiceKey
    extra = 0
    fields = ("prefix", "name", "created_at", "last_used_at", "revoked_at")
    readonly_fields = fields
    can_delete = False

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.action(description="Create a new key for the selected services (shown once)")
def create_key(modeladmin: Any, request: HttpRequest, queryset: Any) -> None:
    for service in queryset:
        created = service_key_create(service_name=service.name, name=f"admin:{request.user}")
        messages.warning(
            request,
            f"New key for {service.name} (copy it now, it is not shown again): {created.secret}",
        )


@admin.register(Service)
class ServiceAdmin(admin.ModelAdmin):
    list_display = ["name", "created_at", "last_event_at"]
    search_fields = ["name"]
    inlines = [ServiceKeyInline]
    actions = [create_key]


@admin.action(description="Revoke the selected keys")
def revoke_keys(modeladmin: Any, request: HttpRequest, queryset: Any) -> None:
    count = queryset.filter(revoked_at__isnull=True).update(revoked_at=timezone.now())
    messages.info(request, f"Revoked {count} key(s).")


@admin.register(ServiceKey)
class ServiceKeyAdmin(admin.ModelAdmin):
    list_display = ["prefix", "service", "name", "created_at", "last_used_at", "revoked_at"]
    list_filter = ["service"]
    readonly_fields = ["prefix", "hashed", "created_at", "last_used_at"]
    actions = [revoke_keys]

    def add_view(self, request: HttpRequest, form_url: str = "", extra_context: Any = None) -> Any:
        messages.info(request, "Create keys from a service: select it and run 'Create a new key'.")
        return HttpResponseRedirect(reverse("admin:tracking_service_changelist"))


@admin.register(Saga)
class SagaAdmin(admin.ModelAdmin):
    list_display = ["saga_id", "saga_type", "status", "current_step", "started_at", "version"]
    list_filter = ["status", "saga_type"]
    search_fields = ["saga_id"]

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # the read model is a projection; it is changed by events only

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False
