// Live updates: one websocket per page; deltas are {saga_id, version}.
// The list refreshes rows it shows when their version grew (one fetch per burst)
// and counts sagas it does not show; the detail page refetches its body.
(function () {
  "use strict";
  const status = () => document.getElementById("live-status");
  function setStatus(text, ok) {
    const el = status();
    if (el) { el.textContent = text; el.classList.toggle("on", ok); }
  }
  let pending = new Set();
  let unseen = 0;
  let timer = null;

  function shownVersion(sagaId) {
    const live = document.getElementById("saga-live");
    if (live && live.dataset.sagaId === sagaId) {
      const body = document.getElementById("saga-body");
      return { kind: "detail", version: Number(body ? body.dataset.version : live.dataset.version) };
    }
    const row = document.querySelector(`tr[data-saga-id="${CSS.escape(sagaId)}"]`);
    if (row) return { kind: "row", version: Number(row.dataset.version) };
    return null;
  }

  function onDeltas(deltas) {
    for (const d of deltas) {
      const shown = shownVersion(d.saga_id);
      if (shown === null) {
        if (document.getElementById("saga-rows")) unseen += 1;
        continue;
      }
      if (d.version <= shown.version) continue;  // stale or already applied
      if (shown.kind === "detail") {
        htmx.trigger("#saga-live", "saga-changed");
      } else {
        pending.add(d.saga_id);
      }
    }
    const banner = document.getElementById("new-sagas");
    if (banner && unseen > 0) {
      banner.hidden = false;
      const link = banner.querySelector("a");
      link.textContent = `${unseen} saga update${unseen > 1 ? "s" : ""} not on this page — show the latest`;
      // the first page of the filter in the address bar (filters change it without a reload)
      const url = new URL(location.href);
      url.searchParams.delete("cursor");
      link.href = url.pathname + url.search;
    }
    if (pending.size && !timer) timer = setTimeout(refreshRows, 150);
  }

  async function refreshRows() {
    timer = null;
    const ids = Array.from(pending);
    pending = new Set();
    const params = new URLSearchParams();
    ids.forEach((id) => params.append("id", id));
    const response = await fetch(`/live/saga-rows?${params}`, { headers: { "HX-Request": "true" } });
    if (!response.ok) return;
    const doc = new DOMParser().parseFromString(await response.text(), "text/html");
    for (const fresh of doc.querySelectorAll("tr[data-saga-id]")) {
      const row = document.getElementById(fresh.id);
      if (row && Number(fresh.dataset.version) > Number(row.dataset.version)) {
        row.replaceWith(fresh);
        fresh.classList.add("flash");
      }
    }
  }

  // Deltas pushed while the socket was down are lost: after a reconnect, refetch
  // what the page shows (the detail body, or every visible row; rows only change
  // when their version grew).
  function catchUp() {
    if (document.getElementById("saga-live")) {
      htmx.trigger("#saga-live", "saga-changed");
      return;
    }
    document.querySelectorAll("#saga-rows tr[data-saga-id]").forEach((row) => pending.add(row.dataset.sagaId));
    if (pending.size && !timer) timer = setTimeout(refreshRows, 0);
  }

  let dropped = false;
  function connect(delay) {
    if (!document.getElementById("live-status")) return;
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const socket = new WebSocket(`${scheme}://${location.host}/ws/sagas`);
    socket.onopen = () => {
      setStatus("● live", true);
      delay = 1000;
      if (dropped) catchUp();
      dropped = false;
    };
    socket.onmessage = (message) => {
      const data = JSON.parse(message.data);
      if (data.type === "sagas.changed") onDeltas(data.deltas);
    };
    socket.onclose = () => {
      dropped = true;
      setStatus("○ reconnecting", false);
      setTimeout(() => connect(Math.min(delay * 2, 30000)), delay);
    };
  }
  document.addEventListener("DOMContentLoaded", () => connect(1000));
})();
