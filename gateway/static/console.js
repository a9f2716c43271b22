// The QA console (GET /console): a tenant's calls over the tenant API, with the key in sessionStorage.
//
// Everything shown is built with text nodes (`el` below): nothing from the API is ever parsed as
// markup, so a caller who says "<script>" is shown saying it. The page is served with a
// Content-Security-Policy that allows this script and its style sheet only.
"use strict";

(() => {
  const KEY = "voxlog.console.key";
  const state = {
    key: sessionStorage.getItem(KEY),
    filters: {},
    offset: 0,
    limit: 25,
    total: 0,
    callId: null,
    audioUrl: null,
    lines: [], // [{position, node}] of the transcript, in recording order
    current: null,
    loading: 0,
  };

  // -- building the page -----------------------------------------------------------------------

  /** An element: `props` sets class, text, title, dataset, attributes and listeners; children are nodes
   * or strings (as text), null and undefined skipped. */
  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    const p = props || {};
    if (p.class) node.className = p.class;
    if (p.text !== undefined && p.text !== null) node.textContent = String(p.text);
    if (p.title) node.title = String(p.title);
    for (const [k, v] of Object.entries(p.data || {})) node.dataset[k] = String(v);
    for (const [k, v] of Object.entries(p.attrs || {})) node.setAttribute(k, String(v));
    for (const [k, v] of Object.entries(p.on || {})) node.addEventListener(k, v);
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  const $ = (id) => document.getElementById(id);

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
    return node;
  }

  function status(text, error) {
    const s = $("vx-status");
    s.textContent = text || "";
    s.classList.toggle("vx-error", !!error);
  }

  function table(node, headers, rows) {
    clear(node);
    node.append(el("thead", null, el("tr", null, ...headers.map((h) => el("th", { text: h })))));
    const body = el("tbody");
    for (const row of rows) body.append(row);
    if (!rows.length) body.append(el("tr", null, el("td", { text: "none", attrs: { colspan: headers.length } })));
    node.append(body);
  }

  const num = (v) => el("td", { class: "vx-num", text: v === null || v === undefined ? "" : v });
  const cell = (v, cls) => el("td", { class: cls || "", text: v === null || v === undefined ? "" : v });

  function when(us) {
    if (us === null || us === undefined) return "";
    return new Date(us / 1000).toISOString().replace("T", " ").slice(0, 19);
  }

  function clock(ms) {
    if (ms === null || ms === undefined) return "";
    const s = Math.floor(ms / 1000);
    return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
  }

  const seconds = (ms) => (ms === null || ms === undefined ? "" : `${(ms / 1000).toFixed(1)} s`);
  const round = (v) => (v === null || v === undefined ? "" : Math.round(v));
  const short = (text, n) => (text && text.length > n ? `${text.slice(0, n)}…` : text || "");

  // -- the API -----------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, detail) {
      super(typeof detail === "string" ? detail : JSON.stringify(detail));
      this.status = status;
    }
  }

  async function api(path, options) {
    const headers = Object.assign({ Authorization: `Bearer ${state.key}` }, (options && options.headers) || {});
    const response = await fetch(path, Object.assign({}, options || {}, { headers, cache: "no-store" }));
    if (response.status === 401) {
      forgetKey("That key is not a tenant's API key.");
      throw new ApiError(401, "unauthorized");
    }
    if (!response.ok) {
      let detail = response.statusText;
      try {
        detail = (await response.json()).detail;
      } catch (e) {
        // not JSON: the status text says it
      }
      throw new ApiError(response.status, detail);
    }
    return response;
  }

  // -- the key -----------------------------------------------------------------------------------

  function showSignedIn(signedIn) {
    $("vx-login").hidden = signedIn;
    $("vx-session").hidden = !signedIn;
    if (!signedIn) {
      $("vx-list").hidden = true;
      $("vx-call").hidden = true;
    }
  }

  function forgetKey(message) {
    state.key = null;
    sessionStorage.removeItem(KEY);
    releaseAudio();
    showSignedIn(false);
    status(message || "Give a tenant API key to see its calls.", !!message);
  }

  // -- the list of calls -------------------------------------------------------------------------

  function fillChoices(select, values) {
    const chosen = select.value;
    clear(select).append(el("option", { text: "any", attrs: { value: "" } }));
    for (const value of values) select.append(el("option", { text: short(value, 40), title: value, attrs: { value } }));
    if (chosen && !values.includes(chosen)) select.append(el("option", { text: short(chosen, 40), attrs: { value: chosen } }));
    select.value = chosen;
  }

  function readFilters() {
    const form = $("vx-filters");
    const filters = {};
    for (const name of ["agent", "agent_version", "outcome", "errors", "fallbacks"]) {
      if (form.elements[name].value) filters[name] = form.elements[name].value;
    }
    const since = form.elements.since.value; // YYYY-MM-DD, a day in UTC
    const until = form.elements.until.value;
    if (since) filters.since = `${since}T00:00:00Z`;
    if (until) {
      const day = new Date(`${until}T00:00:00Z`);
      day.setUTCDate(day.getUTCDate() + 1); // through the end of that day
      filters.until = day.toISOString();
    }
    return filters;
  }

  async function loadList() {
    const query = new URLSearchParams(Object.assign({}, state.filters, { limit: state.limit, offset: state.offset }));
    status("Loading calls…");
    let page;
    try {
      page = await (await api(`/v1/console/calls?${query}`)).json();
    } catch (e) {
      if (e.status !== 401) status(`Cannot list calls: ${e.message}`, true);
      return;
    }
    showSignedIn(true);
    state.total = page.total;
    const form = $("vx-filters");
    fillChoices(form.elements.agent, page.choices.agents);
    fillChoices(form.elements.agent_version, page.choices.agent_versions);
    fillChoices(form.elements.outcome, page.choices.outcomes);
    const rows = page.calls.map((c) => {
      const link = el("a", { text: short(c.call_id, 18), title: c.call_id, attrs: { href: `#/calls/${encodeURIComponent(c.call_id)}` } });
      return el("tr", { data: { callId: c.call_id } },
        cell(when(c.started_at)), el("td", { class: "vx-mono" }, link), cell(c.agent_id),
        cell(short(c.agent_version, 16), "vx-mono"), cell(`${c.channel} ${c.direction}`),
        num(c.ended_at === null ? "live" : seconds(c.duration_ms)), cell(c.outcome || c.end_reason),
        num(c.turns), num(c.tool_calls), el("td", { class: c.errors ? "vx-num vx-bad" : "vx-num", text: c.errors }),
        el("td", { class: c.fallbacks ? "vx-num vx-bad" : "vx-num", text: c.fallbacks }),
        cell(c.recording ? "yes" : c.recording_withheld ? `withheld (${c.recording_withheld})` : "no"));
    });
    const tableNode = $("vx-calls");
    const body = clear(tableNode.tBodies[0]);
    for (const row of rows) body.append(row);
    if (!rows.length) body.append(el("tr", null, el("td", { text: "No calls match.", attrs: { colspan: 12 } })));
    const first = page.total ? state.offset + 1 : 0;
    $("vx-page").textContent = `${first}–${state.offset + page.calls.length} of ${page.total}`;
    $("vx-prev").disabled = state.offset === 0;
    $("vx-next").disabled = state.offset + page.calls.length >= page.total;
    status(`${page.total} calls.`);
  }

  function showList() {
    releaseAudio();
    $("vx-call").hidden = true;
    $("vx-list").hidden = false;
    loadList();
  }

  // -- one call ----------------------------------------------------------------------------------

  function releaseAudio() {
    const audio = $("vx-audio");
    if (audio) {
      audio.pause();
      audio.removeAttribute("src");
      audio.load();
    }
    if (state.audioUrl) URL.revokeObjectURL(state.audioUrl);
    state.audioUrl = null;
  }

  function fact(dl, name, value) {
    dl.append(el("dt", { text: name }), el("dd", { text: value === null || value === undefined ? "" : value }));
  }

  function showFacts(detail) {
    const dl = clear($("vx-facts"));
    const c = detail.call;
    if (!c) {
      fact(dl, "Tables", "no row: the call was erased, or is not projected yet");
      return;
    }
    fact(dl, "Agent", `${c.agent_id} (${short(c.agent_version, 24)})`);
    fact(dl, "Channel", `${c.channel}, ${c.direction}, routed by ${c.routed_by}`);
    fact(dl, "Started (UTC)", when(c.started_at));
    fact(dl, "Duration", c.ended_at === null ? "live" : seconds(c.duration_ms));
    fact(dl, "Outcome", `${c.outcome || "—"} (${c.end_reason || "live"})`);
    fact(dl, "Handoff", c.handoff ? c.handoff_outcome || "requested" : "no");
    fact(dl, "From / to", `${c.from_number || "—"} → ${c.to_number || "—"}`);
    fact(dl, "Consent", [c.consent || "not asked", c.consent_mode, c.consent_method].filter(Boolean).join(", "));
    fact(dl, "Turns / tools / errors", `${c.turns} / ${c.tool_calls} / ${c.errors}`);
  }

  function showReplay(replay) {
    const box = clear($("vx-replay"));
    box.className = `vx-replay vx-${replay.status}`;
    box.dataset.status = replay.status;
    const words = { identical: "Replay: identical", diverged: "Replay: diverged", erased: "Replay: erased",
                    unavailable: "Replay: not checked" };
    box.append(el("strong", { text: words[replay.status] || replay.status }), " — ", replay.detail);
    if (replay.divergence) {
      box.append(el("div", { class: "vx-mono", text: `seq ${replay.divergence.seq} ${replay.divergence.event_type}: ${replay.divergence.reason}` }));
    }
  }

  function showTranscript(lines) {
    const list = clear($("vx-transcript"));
    state.lines = [];
    state.current = null;
    for (const line of lines) {
      const placed = line.position_ms !== null && line.position_ms !== undefined;
      const node = el("li", {
        class: `vx-line vx-${line.speaker === "caller" ? "caller" : "agent"}${placed ? "" : " vx-unplaced"}`,
        data: { speaker: line.speaker, seq: line.seq, position: placed ? line.position_ms : "" },
        title: placed ? "Play from here" : "Not placed in the recording",
      }, el("span", { class: "vx-time", text: clock(line.position_ms) }), el("span", { class: "vx-speaker", text: line.speaker }),
      el("span", { class: "vx-text", text: line.text }));
      if (placed) {
        node.addEventListener("click", () => seek(line.position_ms));
        state.lines.push({ position: line.position_ms, node });
      }
      list.append(node);
    }
    state.lines.sort((a, b) => a.position - b.position);
    if (!lines.length) list.append(el("li", { class: "vx-note", text: "No transcript." }));
  }

  function seek(ms) {
    const audio = $("vx-audio");
    if (!audio.src) return;
    audio.currentTime = ms / 1000;
    follow();
    audio.play().catch(() => {}); // the user clicked: playing is allowed; a failure leaves it paused there
  }

  /** Highlights the line being heard: the last one that starts at or before the player's position. */
  function follow() {
    const now = $("vx-audio").currentTime * 1000 + 1; // a line sought to exactly is the one heard
    let found = null;
    for (const line of state.lines) {
      if (line.position <= now) found = line;
      else break;
    }
    if (found === state.current) return;
    if (state.current) state.current.node.classList.remove("vx-current");
    state.current = found;
    if (!found) return;
    found.node.classList.add("vx-current");
    const list = $("vx-transcript");
    const top = found.node.offsetTop;
    if (top < list.scrollTop || top + found.node.offsetHeight > list.scrollTop + list.clientHeight) {
      list.scrollTop = Math.max(0, top - list.clientHeight / 3);
    }
  }

  async function loadRecording(detail) {
    const note = $("vx-audio-note");
    const c = detail.call;
    if (!detail.recording || !detail.recording.complete) {
      note.textContent = c && c.recording_withheld ? `No recording: ${c.recording_withheld}.`
        : c && c.ended_at === null ? "No recording yet: the call is live." : "No recording.";
      return;
    }
    note.textContent = "Loading the recording…";
    const id = detail.call_id;
    try {
      const blob = await (await api(`/v1/calls/${encodeURIComponent(id)}/recording`)).blob();
      if (state.callId !== id) return; // the user moved on
      state.audioUrl = URL.createObjectURL(blob);
      $("vx-audio").src = state.audioUrl;
      note.textContent = `Stereo: the caller left, the agent right; ${seconds(detail.recording.duration_ms)}.`;
    } catch (e) {
      if (e.status !== 401) note.textContent = `Cannot load the recording: ${e.message}`;
    }
  }

  function showTurns(turns) {
    table($("vx-turns"), ["#", "Caller (redacted)", "Agent (redacted)", "ASR", "ASR ms", "LLM", "LLM first token",
      "LLM total", "TTS", "TTS first byte", "Voice to voice", "Barge-in", "Guardrail"], turns.map((t) => el("tr", null,
      num(t.turn_index), cell(t.caller_text), cell(t.agent_text), cell(`${t.asr_provider} ${t.asr_model}`),
      num(t.asr_latency_ms), cell(`${t.llm_provider} ${t.llm_model} (${t.llm_calls}×, ${t.input_tokens}/${t.output_tokens} tok)`),
      num(t.llm_first_token_ms), num(t.llm_total_ms), cell(`${t.tts_provider} ${t.tts_voice}`), num(t.tts_first_byte_ms),
      num(round(t.voice_to_voice_ms)), cell(t.barge_in ? "yes" : ""), cell(t.guardrail))));
  }

  function showTools(tools) {
    table($("vx-tools"), ["Tool", "Requested (UTC)", "Arguments (redacted)", "Result (redacted)", "Outcome", "Error",
      "Attempts", "Latency ms"], tools.map((t) => el("tr", null, cell(t.tool), cell(when(t.requested_at)),
      cell(t.arguments, "vx-mono"), cell(t.result, "vx-mono"),
      el("td", { class: t.outcome === "failed" ? "vx-bad" : "", text: t.outcome }), cell(t.error), num(t.attempts),
      num(t.latency_ms))));
  }

  function showErrors(errors) {
    table($("vx-errors"), ["seq", "At (UTC)", "Component", "Provider", "Kind", "Message (redacted)", "Fallback to",
      "Retryable", "Fatal"], errors.map((e) => el("tr", { class: e.kind === "fallback" ? "vx-fallback" : "vx-error-row" },
      num(e.seq), cell(when(e.at)), cell(e.component), cell(e.provider), cell(e.kind), cell(e.message),
      cell(e.fallback_to), cell(e.retryable ? "yes" : "no"), cell(e.fatal ? "yes" : "no"))));
  }

  function showTimeline(events) {
    const zero = events.length ? events[0].at : 0;
    table($("vx-timeline"), ["seq", "+ms", "Type", "Producer", "Fields"], events.map((e) => el("tr", null,
      num(e.seq), num(Math.round((e.at - zero) / 1000)), cell(e.type, "vx-mono"), cell(e.producer),
      cell(Object.entries(e.fields).map(([k, v]) => `${k}=${v}`).join(" ") + (e.pii_withheld ? " (personal data withheld)" : ""),
        "vx-mono"))));
  }

  async function showCall(id) {
    releaseAudio();
    state.callId = id;
    $("vx-list").hidden = true;
    $("vx-call").hidden = false;
    $("vx-call-title").textContent = id;
    for (const node of ["vx-facts", "vx-replay", "vx-transcript", "vx-turns", "vx-tools", "vx-errors", "vx-timeline",
      "vx-whatif-result"]) clear($(node));
    $("vx-audio-note").textContent = "";
    status("Loading the call…");
    let detail;
    try {
      detail = await (await api(`/v1/console/calls/${encodeURIComponent(id)}`)).json();
    } catch (e) {
      if (e.status !== 401) status(e.status === 404 ? "No such call." : `Cannot load the call: ${e.message}`, true);
      return;
    }
    if (state.callId !== id) return;
    showSignedIn(true);
    showFacts(detail);
    showReplay(detail.replay);
    showTranscript(detail.transcript);
    showTurns(detail.turns);
    showTools(detail.tool_calls);
    showErrors(detail.errors);
    showTimeline(detail.timeline);
    document.body.dataset.loadedCall = id;
    status("");
    await loadRecording(detail);
  }

  // -- what if -----------------------------------------------------------------------------------

  function act(a) {
    const line = el("div", { class: "vx-act", data: { kind: a.kind } }, el("span", { class: "vx-kind", text: a.kind }));
    if (a.kind === "say") line.append(a.text);
    else if (a.kind === "tool") line.append(`${a.tool}(${a.arguments || ""})`);
    else if (a.kind === "handoff") line.append(`to ${a.target}${a.reason ? `: ${a.reason}` : ""}`);
    else line.append([a.reason, a.text].filter(Boolean).join(": "));
    return line;
  }

  function showWhatIf(result) {
    const box = clear($("vx-whatif-result"));
    box.dataset.changed = String(result.changed);
    const then = `${result.agent_then.id} ${short(result.agent_then.version, 20)}`;
    const now = `${result.agent_now.id} ${short(result.agent_now.version, 20)}`;
    const verdict = result.problem ? "Not compared. " : result.changed ? "Changed. " : "No change. ";
    box.append(el("h3", { text: "What-if result" }),
      el("p", { class: "vx-summary" }, el("strong", { text: verdict }), result.summary),
      el("p", { class: "vx-note", text: `then: ${then} · now: ${now}` +
        (result.first_difference === null ? "" : ` · first difference at turn ${result.first_difference}`) +
        ` · new requests answered by: ${result.llm}` }));
    if (!result.turns.length) return;
    const rows = result.turns.map((t) => {
      const first = t.index === result.first_difference;
      const mark = first ? "first difference" : t.after_difference ? "counterfactual" : t.same ? "same" : "differs";
      return el("tr", { class: first ? "vx-first-diff" : t.after_difference ? "vx-counterfactual" : t.same ? "vx-same" : "vx-differs",
        data: { index: t.index, same: t.same, after: t.after_difference } },
      el("td", null, el("div", { text: `#${t.index}` }), el("div", { class: "vx-mark", text: mark })),
      el("td", { text: t.caller }),
      el("td", null, ...t.then.map(act)),
      el("td", null, ...t.now.map(act)),
      el("td", null, el("div", { text: t.answered_by }), ...t.notes.map((n) => el("div", { class: "vx-note", text: n }))));
    });
    const tableNode = el("table", { class: "vx-table vx-diff" });
    table(tableNode, ["Turn", "Caller said", "Then", "Now", "Answered by"], rows);
    box.append(el("div", { class: "vx-scroll" }, tableNode));
  }

  async function runWhatIf(event) {
    event.preventDefault();
    const id = state.callId;
    const text = $("vx-agent").value;
    const box = clear($("vx-whatif-result"));
    if (!text.trim()) {
      box.append(el("p", { class: "vx-bad", text: "Paste or choose an agent file first." }));
      return;
    }
    const button = $("vx-run-whatif");
    button.disabled = true;
    box.append(el("p", { class: "vx-note", text: "Running…" }));
    try {
      const result = await (await api(`/v1/calls/${encodeURIComponent(id)}/whatif`, {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ agent: text }),
      })).json();
      if (state.callId === id) showWhatIf(result);
    } catch (e) {
      if (e.status !== 401) clear(box).append(el("p", { class: "vx-bad", text: `What-if refused: ${e.message}` }));
    } finally {
      button.disabled = false;
    }
  }

  // -- wiring --------------------------------------------------------------------------------------

  function route() {
    if (!state.key) {
      forgetKey();
      return;
    }
    const hash = location.hash || "#/";
    const match = /^#\/calls\/(.+)$/.exec(hash);
    if (match) showCall(decodeURIComponent(match[1]));
    else showList();
  }

  function start() {
    $("vx-login").addEventListener("submit", (event) => {
      event.preventDefault();
      const key = $("vx-key").value.trim();
      if (!key) return;
      state.key = key;
      sessionStorage.setItem(KEY, key);
      $("vx-key").value = "";
      status("");
      route();
    });
    $("vx-logout").addEventListener("click", () => forgetKey());
    $("vx-filters").addEventListener("submit", (event) => {
      event.preventDefault();
      state.filters = readFilters();
      state.offset = 0;
      loadList();
    });
    $("vx-filters").addEventListener("reset", () => {
      state.filters = {};
      state.offset = 0;
      setTimeout(loadList, 0); // after the form has cleared
    });
    $("vx-prev").addEventListener("click", () => {
      state.offset = Math.max(0, state.offset - state.limit);
      loadList();
    });
    $("vx-next").addEventListener("click", () => {
      state.offset += state.limit;
      loadList();
    });
    $("vx-limit").addEventListener("change", (event) => {
      state.limit = Number(event.target.value);
      state.offset = 0;
      loadList();
    });
    const audio = $("vx-audio");
    for (const name of ["timeupdate", "seeked", "play"]) audio.addEventListener(name, follow);
    $("vx-whatif").addEventListener("submit", runWhatIf);
    $("vx-agent-file").addEventListener("change", async (event) => {
      const file = event.target.files[0];
      if (file) $("vx-agent").value = await file.text();
    });
    window.addEventListener("hashchange", route);
    route();
  }

  start();
})();
