from django.urls import path

from tracking.consumers import SagaLiveConsumer

websocket_urlpatterns = [path("ws/sagas", SagaLiveConsumer.as_asgi())]
