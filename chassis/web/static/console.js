/* agentchassis console: keeps live parts of a page up to date, and asks before a
   destructive form is sent. No libraries.

   An element with data-poll="URL" is refreshed every ~2 s from URL?partial=1 (the
   server renders only that part). A refresh never happens while the user is in a
   form inside it (focus in a field, or a field changed and not sent), so typing is
   never lost. The server answers "X-Poll: stop" once nothing more will change. */
(function () {
  "use strict";

  var EVERY = 2000;

  function fieldFocused(region) {
    var a = document.activeElement;
    return !!(a && region.contains(a) && /^(INPUT|TEXTAREA|SELECT|BUTTON)$/.test(a.tagName)
      && a.type !== "hidden");
  }

  function busy(region) {
    return fieldFocused(region) || region.querySelector("form[data-dirty]") !== null;
  }

  function openDetails(region) {
    var open = [];
    region.querySelectorAll("details[id][open]").forEach(function (d) { open.push(d.id); });
    return open;
  }

  function swap(region, html) {
    var open = openDetails(region);
    region.innerHTML = html;
    open.forEach(function (id) {
      var d = document.getElementById(id);
      if (d) { d.open = true; }
    });
  }

  function note(text, paused) {
    document.querySelectorAll("[data-live-note]").forEach(function (n) {
      n.textContent = text;
      n.classList.toggle("paused", !!paused);
    });
  }

  function poll(region) {
    var url = new URL(region.getAttribute("data-poll"), window.location.href);
    url.searchParams.set("partial", "1");
    var last = null;
    var failures = 0;

    function later() { window.setTimeout(tick, EVERY * Math.min(1 + failures, 5)); }

    function tick() {
      if (document.hidden || busy(region)) { later(); return; }
      fetch(url.toString(), {
        credentials: "same-origin", cache: "no-store", redirect: "manual",
        headers: { "X-Requested-With": "console" }
      }).then(function (r) {
        if (r.type === "opaqueredirect" || r.status === 401) {  // signed out
          note("signed out", true);
          return;
        }
        if (!r.ok) { throw new Error("HTTP " + r.status); }
        var stop = r.headers.get("X-Poll") === "stop";
        return r.text().then(function (html) {
          failures = 0;
          if (html !== last && !busy(region)) {
            swap(region, html);
            last = html;
          }
          note("live", false);
          if (stop) {
            region.removeAttribute("data-poll");
            note("finished", true);
          } else {
            later();
          }
        });
      }).catch(function () {
        failures += 1;
        note("reconnecting…", true);
        later();
      });
    }
    later();
  }

  document.addEventListener("input", function (e) {
    var form = e.target && e.target.closest && e.target.closest("form");
    if (form) { form.setAttribute("data-dirty", ""); }
  });

  document.addEventListener("submit", function (e) {
    var form = e.target;
    var ask = form.getAttribute("data-confirm");
    if (ask && !window.confirm(ask)) { e.preventDefault(); return; }
    form.removeAttribute("data-dirty");
    form.querySelectorAll("button[type=submit]").forEach(function (b) {
      window.setTimeout(function () { b.disabled = true; }, 0);  // after its value is sent
    });
  });

  document.querySelectorAll("[data-poll]").forEach(poll);
})();
