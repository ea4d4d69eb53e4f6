// Train LoRA tab (lora_trainer): the periodic progress refresh and "Use in txt2img".
// A1111 and Forge load this file into <head>; the standalone app runs it once the page has loaded.
// It only touches elements whose id or class starts with lora_trainer_, plus the WebUI's own
// #txt2img_prompt for "Use in txt2img" (through the WebUI's updateInput and switch_to_txt2img).
(function () {
    "use strict";
    var POLL_MS = 1500;

    function appRoot() {
        if (typeof gradioApp === "function") {
            return gradioApp();
        }
        var app = document.getElementsByTagName("gradio-app")[0];
        return app ? (app.shadowRoot || app) : document;
    }

    function find(selector) {
        return appRoot().querySelector(selector) || document.querySelector(selector);
    }

    // Click the hidden Refresh button while the tab is on screen: the server answers from the job's
    // state, so this works without gradio's queue, in every gradio version, and after a page reload.
    function poll() {
        if (document.hidden) {
            return;
        }
        var tab = find("#lora_trainer_tab");
        var button = find("#lora_trainer_refresh");
        if (tab && button && tab.offsetParent !== null) {
            button.click();
        }
    }

    if (!window.loraTrainerPollTimer) {
        window.loraTrainerPollTimer = setInterval(poll, POLL_MS);
    }

    // Keep the right column (Status, the buttons, progress, the result) in view while the settings scroll: CSS
    // position:sticky cannot, as gradio's container clips overflow. Nothing moves when the columns are stacked
    // (a narrow window) or the tab is hidden.
    function followScroll() {
        var row = find("#lora_trainer_tab");
        var column = find("#lora_trainer_output");
        if (!row || !column || row.offsetParent === null) {
            return;
        }
        var stacked = column.getBoundingClientRect().left < row.getBoundingClientRect().left + 40;
        var room = row.getBoundingClientRect().height - column.offsetHeight;
        var shift = stacked ? 0 : Math.max(0, Math.min(8 - row.getBoundingClientRect().top, room));
        column.style.transform = shift > 0 ? "translateY(" + shift + "px)" : "";
    }

    if (!window.loraTrainerFollowScroll) {
        window.loraTrainerFollowScroll = followScroll;
        window.addEventListener("scroll", followScroll, {passive: true});
        window.addEventListener("resize", followScroll, {passive: true});
    }

    function escapeRegExp(text) {
        return text.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
    }

    // Put <lora:name:weight> and the trigger words into the txt2img prompt, then switch to txt2img.
    window.loraTrainerUseInTxt2img = function (name, weight, trigger) {
        var box = find("#txt2img_prompt textarea");
        if (!box || !name) {
            return;
        }
        var tag = "<lora:" + name + ":" + Number(weight) + ">";
        var text = box.value.trim();
        var existing = new RegExp("<lora:" + escapeRegExp(name) + ":[^>]*>");
        text = existing.test(text) ? text.replace(existing, tag) : (text ? text + ", " + tag : tag);
        (trigger || "").split(",").map(function (word) { return word.trim(); }).forEach(function (word) {
            if (word && text.indexOf(word) < 0) {
                text = text + ", " + word;
            }
        });
        box.value = text;
        if (typeof updateInput === "function") {
            updateInput(box);
        } else {
            box.dispatchEvent(new Event("input", {bubbles: true}));
        }
        if (typeof switch_to_txt2img === "function") {
            switch_to_txt2img();
        }
    };
})();
