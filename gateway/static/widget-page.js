// The widget page's own script (GET /widget): mounts the widget. A file of its own, not inline, because
// the page is served under a Content-Security-Policy that runs no inline script.
VoxlogWidget.mount(document.getElementById("voxlog-widget"));
