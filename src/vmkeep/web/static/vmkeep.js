// vmkeep dashboard: times in the browser's zone, live job progress from /v1/events (the session
// cookie authenticates it), and a confirm step before destructive forms. No library.
(function () {
  "use strict";

  function localTimes(root) {
    root.querySelectorAll("time[datetime]").forEach(function (el) {
      var d = new Date(el.getAttribute("datetime"));
      if (!isNaN(d)) {
        el.title = el.getAttribute("datetime");
        el.textContent = d.toLocaleString(undefined, {dateStyle: "medium", timeStyle: "short"});
      }
    });
  }

  function pct(job) {
    if (job.state === "DONE") return 100;
    if (!job.total_bytes) return 0;
    return Math.max(0, Math.min(100, Math.round(100 * job.done_bytes / job.total_bytes)));
  }

  var FINAL = {DONE: 1, FAILED: 1, CANCELLED: 1};

  function onJob(job) {
    document.querySelectorAll('progress[data-job="' + job.id + '"]').forEach(function (bar) {
      bar.value = pct(job);
    });
    document.querySelectorAll('[data-job-state="' + job.id + '"]').forEach(function (el) {
      if (el.textContent !== job.state) {
        el.textContent = job.state;
        el.className = "state state-" + job.state.toLowerCase();
      }
    });
    var page = document.querySelector("[data-reload-when-ended]");
    if (page && String(job.id) === page.getAttribute("data-reload-when-ended") && FINAL[job.state]
        && !reloading && !leaving) {
      reloading = window.setTimeout(function () { if (!leaving) window.location.reload(); }, 300);
    }
  }

  // a reload still pending when the user goes elsewhere would take the user back here
  var reloading = 0, leaving = false;
  function leave() {
    leaving = true;
    if (reloading) window.clearTimeout(reloading);
  }
  window.addEventListener("beforeunload", leave);
  window.addEventListener("pagehide", leave);

  function onVm(vm) {
    document.querySelectorAll('[data-vm-state="' + CSS.escape(vm.name) + '"]').forEach(function (el) {
      el.textContent = vm.state;
    });
  }

  function live() {
    // only while a job shown here may still change: the stream starts with every job's state
    var live = Array.prototype.some.call(document.querySelectorAll("[data-job-state]"), function (el) {
      return !FINAL[el.textContent.trim()];
    });
    if (!(live || document.querySelector("[data-reload-when-ended]")) || !window.EventSource) return;
    var source = new EventSource("/v1/events");
    source.addEventListener("job", function (e) { onJob(JSON.parse(e.data)); });
    source.addEventListener("vm", function (e) { onVm(JSON.parse(e.data)); });
    source.addEventListener("end", function () { source.close(); });
    window.addEventListener("pagehide", function () { source.close(); });
  }

  function confirms() {
    document.addEventListener("submit", function (e) {
      var form = e.target;
      var text = form.getAttribute && form.getAttribute("data-confirm");
      if (text && !window.confirm(text)) e.preventDefault();
    });
  }

  // on a phone each table row becomes a card: every cell labelled with its column's heading
  function labelCells(root) {
    root.querySelectorAll(".table-wrap > table").forEach(function (table) {
      var heads = Array.prototype.map.call(table.querySelectorAll("thead th"), function (th) {
        return th.textContent.trim();
      });
      table.querySelectorAll("tbody tr").forEach(function (tr) {
        Array.prototype.forEach.call(tr.children, function (td, i) {
          if (heads[i]) td.setAttribute("data-label", heads[i]);
        });
      });
      table.parentNode.classList.add("stacked");
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    labelCells(document);
    localTimes(document);
    confirms();
    live();
  });
})();
