// edgeship console: live regions and confirmations. No library, nothing fetched from elsewhere.
"use strict";
(function () {
  // A region with data-live="/url?part=live" is re-fetched every 2 s (data-interval ms) and
  // replaced when its content changed; a lost session goes back to the login page.
  document.querySelectorAll("[data-live]").forEach(function (region) {
    var url = region.getAttribute("data-live");
    var every = parseInt(region.getAttribute("data-interval") || "2000", 10);
    var busy = false;
    setInterval(function () {
      if (busy || document.hidden) { return; }
      busy = true;
      fetch(url, { credentials: "same-origin", headers: { "Accept": "text/html" } })
        .then(function (response) {
          if (response.status === 401) { window.location.href = "/login?next=" + encodeURIComponent(window.location.pathname + window.location.search); return null; }
          return response.ok ? response.text() : null;
        })
        .then(function (html) {
          if (html !== null && html !== undefined && html !== region.innerHTML) {
            region.innerHTML = html;
            region.setAttribute("data-updated", String(Date.now()));
          }
        })
        .catch(function () { /* the next tick tries again */ })
        .then(function () { busy = false; });
    }, every);
  });
  // Forms with data-confirm ask first (abort, roll back, promote).
  document.addEventListener("submit", function (event) {
    var message = event.target.getAttribute("data-confirm");
    if (message && !window.confirm(message)) { event.preventDefault(); }
  });
})();
