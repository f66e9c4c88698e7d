// Filter forms whose results htmx swaps in and pushes into the address bar
// (the saga list): the controls always show the filter in the address bar.
(function () {
  "use strict";
  // Back/Forward: htmx restores the page's HTML, but a control's current value is not
  // in it (only the value it was rendered with): set every control from the URL.
  function syncFromUrl() {
    const params = new URLSearchParams(location.search);
    document.querySelectorAll("form[hx-push-url]").forEach((form) => {
      for (const el of form.elements) {
        if (!el.name || el.type === "submit" || el.type === "button") continue;
        if (el.type === "hidden") {
          if (params.has(el.name)) el.value = params.get(el.name);
          else if (el.dataset.default !== undefined) el.value = el.dataset.default;
          continue;
        }
        el.value = params.get(el.name) ?? "";
        if (el.tagName === "SELECT" && el.selectedIndex < 0) el.selectedIndex = 0;
      }
    });
  }
  document.addEventListener("htmx:historyRestore", syncFromUrl);
  window.addEventListener("pageshow", (event) => { if (event.persisted) syncFromUrl(); });

  // One history entry per filter: Enter in a text field fires "change" and "submit"
  // (two requests for one URL), and Filter with nothing changed asks for the URL shown.
  document.addEventListener("htmx:beforeHistoryUpdate", (event) => {
    const update = event.detail.history;
    if (update.type === "push" && new URL(update.path, location.href).href === location.href) {
      update.type = "replace";
    }
  });
})();
