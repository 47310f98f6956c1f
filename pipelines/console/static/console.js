// The console's little JavaScript: live device cards (server-sent events), live pipeline
// counters (polling the JSON of the pipelines page), select-all and confirmations.
(function () {
  "use strict";
  var P = document.body.dataset.prefix || "/console";

  function ago(t) {
    if (!t) return "never";
    var d = Math.max(0, Date.now() / 1000 - t);
    if (d < 60) return Math.round(d) + " s ago";
    if (d < 3600) return Math.round(d / 60) + " min ago";
    return (d / 3600).toFixed(1) + " h ago";
  }

  function set(card, field, text) {
    var el = card.querySelector('[data-field="' + field + '"]');
    if (el && text !== undefined && text !== null) el.textContent = text;
    return el;
  }

  // -- devices ------------------------------------------------------------------------
  var cards = document.getElementById("cards");
  if (cards && window.EventSource) {
    var live = document.getElementById("live");
    var refreshing = null;
    var refreshCards = function () {
      if (refreshing) return;
      refreshing = setTimeout(function () {
        fetch(P + "/cards", {credentials: "same-origin"}).then(function (r) { return r.ok ? r.text() : null; })
          .then(function (html) { if (html !== null) cards.innerHTML = html; refreshing = null; },
                function () { refreshing = null; });
      }, 300);
    };
    var es = new EventSource(P + "/events");
    es.onopen = function () { if (live) { live.textContent = "live"; live.className = "live on"; } };
    es.onerror = function () { if (live) { live.textContent = "reconnecting…"; live.className = "live"; } };
    var update = function (e) {
      var ev = JSON.parse(e.data);
      var card = cards.querySelector('.card[data-key="' + CSS.escape(ev.key) + '"]');
      if (!card) { refreshCards(); return; }
      var seen = set(card, "last_seen", ago(ev.last_seen));
      if (seen) seen.dataset.time = ev.last_seen || "";
      set(card, "frames", ev.frames);
      set(card, "answers", ev.answers);
      if (ev.type === "frame" && ev.frame_id) {
        var box = card.querySelector(".thumb");
        var img = box.querySelector("img.frame");
        if (!img) {
          box.innerHTML = "";
          img = document.createElement("img");
          img.className = "frame";
          img.alt = "latest frame from " + ev.device;
          box.appendChild(img);
        }
        img.src = P + "/devices/" + encodeURIComponent(ev.project) + "/" + encodeURIComponent(ev.device) +
          "/frame?id=" + encodeURIComponent(ev.frame_id);
      }
      if (ev.type === "answer") {
        set(card, "caption", ev.caption || "(empty answer)");
        set(card, "latency", ev.latency !== null ? Math.round(ev.latency * 1000) + " ms" : "–");
        set(card, "answer_path", ev.answer_path);
        card.classList.remove("flash-answer");
        void card.offsetWidth;
        card.classList.add("flash-answer");
      }
    };
    ["frame", "answer", "message"].forEach(function (t) { es.addEventListener(t, update); });
    setInterval(function () {
      cards.querySelectorAll('[data-field="last_seen"]').forEach(function (el) {
        if (el.dataset.time) el.textContent = ago(parseFloat(el.dataset.time));
      });
    }, 1000);
  }

  // -- pipelines: counters refreshed every 2 s ------------------------------------------
  var tables = document.querySelectorAll("table.steps");
  if (tables.length) {
    setInterval(function () {
      fetch(P + "/pipelines?format=json", {credentials: "same-origin"}).then(function (r) { return r.ok ? r.json() : null; })
        .then(function (data) {
          if (!data) return;
          data.pipelines.forEach(function (p) {
            var table = document.querySelector('table.steps[data-pipeline="' + CSS.escape(p.name) + '"]');
            if (!table) return;
            p.steps.forEach(function (s) {
              var row = table.querySelector('tr[data-step="' + CSS.escape(s.name) + '"]');
              if (!row) return;
              ["delivered", "queued", "in_flight", "retries"].forEach(function (c) {
                var cell = row.querySelector('[data-col="' + c + '"]');
                if (cell && s[c] !== null) cell.textContent = s[c];
              });
              var dead = row.querySelector('[data-col="dead"]');
              var a = dead && dead.querySelector("a");
              if (a) a.textContent = s.dead; else if (dead) dead.textContent = s.dead;
            });
          });
          Object.keys(data.books).forEach(function (k) {
            var b = document.querySelector('[data-book="' + k + '"]');
            if (b) b.textContent = data.books[k];
          });
        }, function () {});
    }, 2000);
  }

  // -- dead letters --------------------------------------------------------------------
  var all = document.getElementById("all");
  if (all) {
    all.addEventListener("change", function () {
      document.querySelectorAll('#letters input[name="id"]').forEach(function (c) { c.checked = all.checked; });
    });
  }
  document.querySelectorAll("button[data-confirm]").forEach(function (b) {
    b.addEventListener("click", function (e) { if (!window.confirm(b.dataset.confirm)) e.preventDefault(); });
  });
})();
