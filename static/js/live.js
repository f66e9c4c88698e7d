// Live updates: one websocket per page; deltas are {saga_id, version}.
// The list refreshes rows it shows when their version grew (one fetch per burst)
// and counts the changed sagas it does not show that the first page of its filter
// shows (asked of the server); the detail page refetches its body.
(function () {
  "use strict";
  const status = () => document.getElementById("live-status");
  function setStatus(text, ok) {
    const el = status();
    if (el) { el.textContent = text; el.classList.toggle("on", ok); }
  }
  let pending = new Set();
  let candidates = new Set();  // changed sagas the list does not show: do they match its filter?
  let news = new Set();  // ... those the first page of the filter shows now
  let timer = null;
  let newsTimer = null;

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
        if (document.getElementById("saga-rows") && !news.has(d.saga_id)) candidates.add(d.saga_id);
        continue;
      }
      if (d.version <= shown.version) continue;  // stale or already applied
      if (shown.kind === "detail") {
        htmx.trigger("#saga-live", "saga-changed");
      } else {
        pending.add(d.saga_id);
      }
    }
    if (pending.size && !timer) timer = setTimeout(refreshRows, 150);
    if (candidates.size && !newsTimer) newsTimer = setTimeout(checkNews, 1000);
  }

  // The filter in the address bar, first page (filters change it without a reload).
  function firstPage() {
    const url = new URL(location.href);
    url.searchParams.delete("cursor");
    return url;
  }

  // Ask the server which changed sagas the first page of this filter shows (at most one
  // request a second): the banner promises only what "show them" will show.
  async function checkNews() {
    const ids = Array.from(candidates).slice(-100);
    candidates = new Set();
    const asked = location.search;
    const params = firstPage().searchParams;
    ids.forEach((id) => params.append("id", id));
    try {
      const response = await fetch(`/live/saga-news?${params}`, { headers: { "HX-Request": "true" } });
      if (response.ok && location.search === asked) {
        for (const id of (await response.json()).ids) {
          if (!document.querySelector(`tr[data-saga-id="${CSS.escape(id)}"]`)) news.add(id);
        }
        showNews();
      }
    } finally {
      newsTimer = candidates.size ? setTimeout(checkNews, 1000) : null;
    }
  }

  function showNews() {
    const banner = document.getElementById("new-sagas");
    if (!banner) return;
    banner.hidden = news.size === 0;
    const link = banner.querySelector("a");
    const n = news.size;
    link.textContent = `${n} newer saga${n > 1 ? "s" : ""} match${n > 1 ? "" : "es"} this filter — show ${n > 1 ? "them" : "it"}`;
    const url = firstPage();
    link.href = url.pathname + url.search;
  }

  // Another filter or page (htmx swapped the table, or Back restored one): start counting again.
  function forgetNews() {
    candidates = new Set();
    news = new Set();
    showNews();
  }
  document.addEventListener("htmx:afterSwap", (event) => {
    if (event.detail.target && event.detail.target.id === "saga-table") forgetNews();
  });
  document.addEventListener("htmx:historyRestore", forgetNews);

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
