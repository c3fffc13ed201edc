// sd-webui-training: keeps the visible training panels up to date.
//
// Each run panel's progress bar names a hidden "poll" button (data-sdwt-poll) and the run's state
// (data-sdwt-state). About once a second while a run goes on, and every few seconds otherwise, this
// clicks the button of each panel that is on screen; its handler is cheap, bypasses Gradio's queue,
// and sends only what changed. This works alike in Gradio 3.41 (A1111) and 4.40 (Forge, the
// standalone app), and never holds a queue slot the way a long-running event would.
//
// It also marks each of our fields whose text starts with the problem mark (lib_training/app/ui/form.py
// ERROR_MARK) with the class sdwt-invalid (red border, the problem under the input: style.css). Gradio 4
// gets the class from the server too; Gradio 3.41's updates cannot set classes, so there only this does.
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
    var ERROR_MARK = "\u26a0"; // form.py ERROR_MARK
    var INVALID_CLASS = "sdwt-invalid"; // form.py INVALID_CLASS

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

    function fieldText(block) {
        // Gradio's info text: after the label of a text, number, dropdown or slider field; before a switch's box
        var info = block.querySelector('[data-testid="block-info"] + div');
        if (!info) {
            var box = block.querySelector('label > input[type="checkbox"]');
            info = box && box.parentElement.previousElementSibling;
        }
        return info ? info.textContent.trim() : "";
    }

    function markInvalidFields(root) {
        var blocks = root.querySelectorAll('.block[id^="sdwt-"]');
        for (var i = 0; i < blocks.length; i++) {
            var block = blocks[i];
            if (block.querySelector("div.block")) {
                continue; // a group, not a field
            }
            var invalid = fieldText(block).indexOf(ERROR_MARK) === 0;
            if (block.classList.contains(INVALID_CLASS) !== invalid) {
                block.classList.toggle(INVALID_CLASS, invalid);
            }
        }
    }

    function tick() {
        if (document.hidden) {
            return;
        }
        var root = appRoot();
        markInvalidFields(root);
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
