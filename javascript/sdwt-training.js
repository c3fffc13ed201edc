// sd-webui-training: keeps the visible training panels up to date.
//
// Each run panel's progress bar names a hidden "poll" button (data-sdwt-poll) and the run's state
// (data-sdwt-state). About once a second while a run goes on, and every few seconds otherwise, this
// clicks the button of each panel that is on screen; its handler is cheap, bypasses Gradio's queue,
// and sends only what changed. This works alike in Gradio 3.41 (A1111) and 4.40 (Forge, the
// standalone app), and never holds a queue slot the way a long-running event would.
(function () {
    "use strict";
    if (window.sdwtTrainingPolling) {
        return; // loaded twice (the host's injection and the app's own): one timer is enough
    }
    window.sdwtTrainingPolling = true;

    var FAST_MS = 1000; // while a run goes on
    var IDLE_MS = 4000; // otherwise: notices runs started elsewhere (the API, another browser tab)
    var TICK_MS = 250;
    var lastPoll = {}; // poll button id -> time of its last click

    function appRoot() {
        var app = document.querySelector("gradio-app");
        return (app && app.shadowRoot) || document;
    }

    function pollButton(root, id) {
        var element = root.querySelector("#" + id);
        if (element && element.tagName !== "BUTTON") {
            element = element.querySelector("button") || element;
        }
        return element;
    }

    function tick() {
        if (document.hidden) {
            return;
        }
        var root = appRoot();
        var panels = root.querySelectorAll(".sdwt-progress[data-sdwt-poll]");
        var now = Date.now();
        for (var i = 0; i < panels.length; i++) {
            var panel = panels[i];
            if (panel.offsetParent === null) {
                continue; // its tab is not shown
            }
            var id = panel.getAttribute("data-sdwt-poll");
            var state = panel.getAttribute("data-sdwt-state");
            var wait = state === "running" || state === "busy" ? FAST_MS : IDLE_MS;
            if (lastPoll[id] && now - lastPoll[id] < wait) {
                continue;
            }
            var button = pollButton(root, id);
            if (button) {
                lastPoll[id] = now;
                button.click();
            }
        }
    }

    setInterval(tick, TICK_MS);
})();
