// The p2pchat page: everything it shows comes from the node's REST API and
// its WebSocket of events. Peer-provided text is only ever set with
// textContent, never parsed as HTML.
'use strict';

const $ = (id) => document.getElementById(id);
const PEER_ID = /^[0-9a-f]{40}$/;
const PAGE = 50;
// Status order: neither an event nor a page fetched before it moves a
// message back; "failed" is final here (a retry makes a new message).
const RANK = { created: 0, sent: 1, delivered: 2, read: 3, failed: 4 };
const MARKS = { created: '○', sent: '✓', delivered: '✓✓', read: '✓✓', failed: '!' };

const state = {
  me: null,
  conversations: [],
  current: null, // the open conversation's ID
  messages: new Map(), // the open conversation's messages by ID
  cursor: null, // next_cursor of the oldest page shown
  members: [],
  socket: null,
  backoff: 500,
  listTimer: null,
  listRequest: 0, // the newest conversation-list request; older answers are stale
  invitationRequest: 0, // the same, for the invitation list
  sending: false,
  retried: new Set(), // failed messages already sent again
  live: new Set(), // messages shown from events since the last page load
};

// ---- The API -----------------------------------------------------------

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function api(method, path, body) {
  const options = { method, headers: {}, credentials: 'same-origin' };
  if (body !== undefined) {
    options.headers['Content-Type'] = 'application/json';
    options.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, options);
  } catch (e) {
    throw new ApiError(0, 'network', 'the node does not answer; is it running?');
  }
  let data = null;
  if (response.status !== 204) {
    try { data = await response.json(); } catch (e) { data = null; }
  }
  if (!response.ok) {
    const error = data && data.error ? data.error : { code: 'http', message: `HTTP ${response.status}` };
    throw new ApiError(response.status, error.code, error.message);
  }
  return data;
}

// ---- Small helpers -----------------------------------------------------

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function shortId(peer) {
  return peer ? `${peer.slice(0, 8)}…` : '';
}

function formatTime(seconds) {
  if (!seconds) return '';
  const date = new Date(seconds * 1000);
  const now = new Date();
  if (date.toDateString() === now.toDateString()) {
    return date.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
  }
  return date.toLocaleDateString([], { month: 'short', day: 'numeric' });
}

function conversationName(c) {
  return c.conversation_type === 'group' ? c.group_name : shortId(c.peer_id);
}

function currentConversation() {
  return state.conversations.find((c) => c.conversation_id === state.current) || null;
}

function showBanner(text) {
  const banner = $('banner');
  banner.textContent = text;
  banner.hidden = !text;
}

// ---- Start-up and sign-in ----------------------------------------------

async function start() {
  bindControls();
  try {
    state.me = await api('GET', '/api/node');
  } catch (e) {
    if (e.status === 401) {
      $('login').hidden = false;
      $('login-token').focus();
      return;
    }
    showBanner(`Cannot reach the node: ${e.message}`);
    setTimeout(start, 2000);
    return;
  }
  $('login').hidden = true;
  $('app').hidden = false;
  $('my-id').textContent = state.me.peer_id;
  $('my-id').title = state.me.peer_id;
  document.title = `p2pchat · ${shortId(state.me.peer_id)}`;
  connectSocket();
  await refreshConversations();
  await refreshRelay();
  setInterval(refreshRelay, 10000);
}

let bound = false;
function bindControls() {
  if (bound) return;
  bound = true;
  $('login-form').addEventListener('submit', async (e) => {
    e.preventDefault();
    try {
      await api('POST', '/auth', { token: $('login-token').value.trim() });
      location.reload();
    } catch (err) {
      $('login-error').textContent = err.message;
    }
  });
  $('copy-id').addEventListener('click', copyMyId);
  $('new-conversation').addEventListener('click', () => openDialog('conversation-dialog', 'conversation-peer'));
  $('new-group').addEventListener('click', () => openDialog('group-dialog', 'group-name'));
  $('conversation-form').addEventListener('submit', createConversation);
  $('group-form').addEventListener('submit', createGroup);
  for (const cancel of document.querySelectorAll('dialog .cancel')) {
    cancel.addEventListener('click', () => cancel.closest('dialog').close());
  }
  $('composer').addEventListener('submit', sendMessage);
  $('input').addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $('composer').requestSubmit();
    }
  });
  $('input').addEventListener('input', growInput);
  $('older').addEventListener('click', loadOlder);
  $('back').addEventListener('click', closeConversation);
  $('members-toggle').addEventListener('click', () => toggleMembers());
  $('members-close').addEventListener('click', () => {
    toggleMembers(false);
    markReadIfSeen();
  });
  $('invite-form').addEventListener('submit', invite);
  $('leave').addEventListener('click', leaveGroup);
  document.addEventListener('visibilitychange', markReadIfSeen);
  document.addEventListener('keydown', (e) => {
    if (e.key === 'Escape' && !$('members').hidden && !document.querySelector('dialog[open]')) toggleMembers(false);
  });
}

async function copyMyId() {
  const id = state.me.peer_id;
  try {
    await navigator.clipboard.writeText(id);
  } catch (e) {
    // Without clipboard access, select the text for the user to copy.
    const range = document.createRange();
    range.selectNodeContents($('my-id'));
    const selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
  }
  $('copy-id').textContent = 'Copied';
  setTimeout(() => { $('copy-id').textContent = 'Copy'; }, 1500);
}

async function refreshRelay() {
  try {
    const status = await api('GET', '/api/relay/status');
    const relays = status.relays || [];
    const up = relays.filter((r) => r.connected).length;
    $('relay-status').textContent = relays.length === 0 ? 'no relay'
      : relays.length === 1 ? (up ? 'relay connected' : 'relay unreachable')
      : up === 0 ? `relays unreachable (0 of ${relays.length})`
      : `${up} of ${relays.length} relays connected`;
    // Each relay, and why one is down, on hover.
    $('relay-status').title = relays.map((r) => `${r.address}: `
      + (r.connected ? 'connected' : `not connected${r.last_error ? ` (${r.last_error})` : ''}`)).join('\n');
  } catch (e) {
    $('relay-status').textContent = 'relay status unknown';
  }
}

// ---- The WebSocket -----------------------------------------------------

function connectSocket() {
  const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
  const socket = new WebSocket(`${scheme}://${location.host}/api/ws`);
  state.socket = socket;
  socket.addEventListener('open', () => {
    state.backoff = 500;
    $('ws-dot').classList.add('up');
    $('ws-status').textContent = 'connected';
    showBanner('');
    // Whatever happened while the socket was down is fetched again.
    refreshConversations();
    if (state.current) {
      reloadMessages();
      const c = currentConversation();
      if (c && c.conversation_type === 'group') loadMembers();
    }
  });
  socket.addEventListener('message', (e) => {
    let event;
    try { event = JSON.parse(e.data); } catch (err) { return; }
    handleEvent(event);
  });
  socket.addEventListener('close', (e) => {
    if (state.socket !== socket) return;
    $('ws-dot').classList.remove('up');
    $('ws-status').textContent = 'disconnected';
    const why = e.reason ? ` (${e.reason})` : '';
    const wait = state.backoff;
    showBanner(`Lost the connection to the node${why}. Reconnecting…`);
    state.backoff = Math.min(state.backoff * 2, 10000);
    setTimeout(async () => {
      // A socket refused for the token (a new token, a cleared cookie)
      // would only fail again: sign in instead.
      try {
        await api('GET', '/api/node');
      } catch (err) {
        if (err.status === 401) {
          showBanner('');
          $('app').hidden = true;
          $('login').hidden = false;
          return;
        }
      }
      connectSocket();
    }, wait);
  });
}

function handleEvent(event) {
  const p = event.payload || {};
  switch (event.type) {
    case 'chat.message.created':
    case 'chat.message.received':
    case 'chat.message.updated':
      if (p.conversation_id === state.current) {
        upsertMessage(p);
        if (event.type === 'chat.message.received') markReadIfSeen();
      }
      scheduleListRefresh();
      break;
    case 'chat.message.sent':
    case 'chat.message.delivered':
    case 'chat.message.read':
    case 'chat.message.failed': {
      const status = event.type.slice('chat.message.'.length);
      const message = state.messages.get(p.message_id);
      if (message) {
        if ((RANK[status] ?? 0) > (RANK[message.status] ?? 0)) {
          message.status = status;
          if (status === 'failed') message.failure_reason = p.failure_reason;
          upsertMessage(message);
        }
      }
      scheduleListRefresh();
      break;
    }
    case 'chat.conversation.updated':
      if (p.conversation_id === state.current && Array.isArray(p.members)) {
        state.members = p.members;
        renderMembers();
      }
      scheduleListRefresh();
      break;
    case 'chat.conversation.created':
    case 'chat.conversations.updated':
    case 'chat.group.invite':
      scheduleListRefresh();
      break;
    default:
      break;
  }
}

// Bursts of events ask for one list refresh.
function scheduleListRefresh() {
  if (state.listTimer) return;
  state.listTimer = setTimeout(() => {
    state.listTimer = null;
    refreshConversations();
  }, 150);
}

// ---- The conversation list ---------------------------------------------

async function refreshConversations() {
  const request = ++state.listRequest;
  let data;
  try {
    data = await api('GET', '/api/chat/conversations');
  } catch (e) {
    return;
  }
  if (request !== state.listRequest) return;
  state.conversations = data.conversations;
  renderConversations();
  await refreshInvitations();
  if (state.current && !currentConversation()) closeConversation();
  else if (state.current) renderHeader();
}

function renderConversations() {
  const list = $('conversations');
  const focused = document.activeElement && document.activeElement.dataset
    ? document.activeElement.dataset.conversation : undefined;
  list.replaceChildren();
  for (const c of state.conversations) {
    const item = el('li');
    const button = el('button', 'conversation-item');
    button.type = 'button';
    button.dataset.conversation = c.conversation_id;
    button.setAttribute('aria-current', String(c.conversation_id === state.current));
    const name = el('span', 'name', conversationName(c));
    name.title = c.conversation_type === 'group' ? c.group_name : c.peer_id;
    const time = el('span', 'time', formatTime(c.last_message_at || c.updated_at));
    let last = 'No messages yet';
    if (c.last_message) {
      const who = c.last_message.is_outgoing ? 'You: '
        : c.conversation_type === 'group' ? `${shortId(c.last_message.sender_peer_id)}: ` : '';
      last = who + c.last_message.content;
    }
    if (c.left) last = `You left · ${last}`;
    const lastLine = el('span', 'last', last);
    button.append(name, time, lastLine);
    if (c.unread_count > 0) {
      const badge = el('span', 'badge', String(c.unread_count));
      badge.setAttribute('aria-label', `${c.unread_count} unread`);
      button.append(badge);
    }
    button.addEventListener('click', () => openConversation(c.conversation_id));
    item.append(button);
    list.append(item);
    if (focused === c.conversation_id) button.focus();
  }
  $('no-conversations').hidden = state.conversations.length > 0;
}

// ---- Group invitations -------------------------------------------------

async function refreshInvitations() {
  const request = ++state.invitationRequest;
  let data;
  try {
    data = await api('GET', '/api/chat/invitations');
  } catch (e) {
    return;
  }
  // An older answer that arrives late would show answered invitations again.
  if (request !== state.invitationRequest) return;
  const list = $('invitation-list');
  list.replaceChildren();
  for (const invitation of data.invitations) {
    const item = el('li', 'invitation');
    item.dataset.conversation = invitation.conversation_id;
    const name = el('span', 'name', invitation.group_name);
    const others = invitation.members.length - 1;
    const from = el('span', 'from',
      `from ${shortId(invitation.invited_by)} · ${others} other member${others === 1 ? '' : 's'}`
      + ` · ${formatTime(invitation.received_at)}`);
    from.title = `${invitation.invited_by}; unanswered invitations expire with the message TTL (30 days by default)`;
    const accept = el('button', 'small accept', 'Accept');
    accept.type = 'button';
    accept.addEventListener('click', () => answerInvitation(invitation, true));
    const decline = el('button', 'small decline', 'Decline');
    decline.type = 'button';
    decline.addEventListener('click', () => answerInvitation(invitation, false));
    item.append(name, from, accept, decline);
    list.append(item);
  }
  $('invitations').hidden = data.invitations.length === 0;
}

async function answerInvitation(invitation, accept) {
  const error = $('invitation-error');
  error.textContent = '';
  if (!accept && !window.confirm(
    `Decline "${invitation.group_name}"? Its admin is told, and nothing of the group is kept.`)) return;
  const id = invitation.conversation_id;
  try {
    await api('POST', `/api/chat/groups/${id}/${accept ? 'accept' : 'decline'}`);
  } catch (err) {
    error.textContent = err.message;
    await refreshInvitations();
    return;
  }
  await refreshConversations();
  if (accept) await openConversation(id);
}

// ---- Creating chats ----------------------------------------------------

function openDialog(id, focus) {
  const dialog = $(id);
  dialog.querySelector('form').reset();
  dialog.querySelector('.error').textContent = '';
  dialog.showModal();
  $(focus).focus();
}

async function createConversation(e) {
  e.preventDefault();
  const peer = $('conversation-peer').value.trim().toLowerCase();
  const error = $('conversation-error');
  if (!PEER_ID.test(peer)) {
    error.textContent = 'A peer ID is 40 hexadecimal characters (0-9, a-f).';
    return;
  }
  if (peer === state.me.peer_id) {
    error.textContent = 'That is your own peer ID.';
    return;
  }
  try {
    const c = await api('POST', '/api/chat/conversations', { peer_id: peer });
    $('conversation-dialog').close();
    await refreshConversations();
    openConversation(c.conversation_id);
  } catch (err) {
    error.textContent = err.message;
  }
}

async function createGroup(e) {
  e.preventDefault();
  const error = $('group-error');
  const name = $('group-name').value.trim();
  const ids = $('group-members').value.split(/[\s,;]+/).map((s) => s.trim().toLowerCase()).filter(Boolean);
  const bad = ids.filter((id) => !PEER_ID.test(id));
  const others = [...new Set(ids.filter((id) => id !== state.me.peer_id))];
  if (!name) {
    error.textContent = 'Give the group a name.';
    return;
  }
  if (bad.length) {
    error.textContent = `Not a peer ID (40 hexadecimal characters): ${bad[0]}`;
    return;
  }
  if (others.length < 2) {
    error.textContent = `A group needs at least 2 other members (3 people with you); ${others.length} given.`;
    return;
  }
  try {
    const group = await api('POST', '/api/chat/groups', { group_name: name, members: others });
    $('group-dialog').close();
    await refreshConversations();
    openConversation(group.conversation_id);
  } catch (err) {
    error.textContent = err.message;
  }
}

// ---- One conversation --------------------------------------------------

async function openConversation(id) {
  if (state.current !== id) {
    state.current = id;
    state.messages = new Map();
    state.live = new Set();
    state.cursor = null;
    $('messages').replaceChildren();
    $('send-error').textContent = '';
    $('input').value = '';
  }
  $('placeholder').hidden = true;
  $('conversation').hidden = false;
  $('app').classList.add('in-conversation');
  renderConversations();
  renderHeader();
  await reloadMessages();
  const c = currentConversation();
  if (c && c.conversation_type === 'group') await loadMembers();
  else toggleMembers(false);
  $('input').focus();
}

function closeConversation() {
  const was = state.current;
  state.current = null;
  state.messages = new Map();
  $('conversation').hidden = true;
  $('placeholder').hidden = false;
  $('app').classList.remove('in-conversation');
  toggleMembers(false);
  renderConversations();
  const item = was && document.querySelector(`.conversation-item[data-conversation="${CSS.escape(was)}"]`);
  if (item) item.focus();
}

function renderHeader() {
  const c = currentConversation();
  if (!c) return;
  const group = c.conversation_type === 'group';
  $('chat-title').textContent = conversationName(c);
  if (group) {
    const present = state.members.filter((m) => !m.left_at).length;
    $('chat-subtitle').textContent = present ? `Group · ${present} members` : 'Group';
  } else {
    $('chat-subtitle').textContent = c.peer_id;
  }
  $('members-toggle').hidden = !group;
  const left = group && c.left;
  $('composer').hidden = left;
  $('composer-note').hidden = !left;
  $('composer-note').textContent = left ? 'You left this group: its history stays, but you can no longer send.' : '';
}

// The newest page, in the node's order (which is the order messages were
// stored, not the peers' clocks); older pages are dropped and can be loaded
// again, so nothing missed while disconnected is left out.
async function reloadMessages() {
  const id = state.current;
  if (!id) return;
  let page;
  try {
    page = await api('GET', `/api/chat/conversations/${id}/messages?limit=${PAGE}`);
  } catch (e) {
    $('send-error').textContent = e.message;
    return;
  }
  if (state.current !== id) return;
  const known = state.messages;
  const live = state.live;
  state.live = new Set();
  state.messages = new Map();
  $('messages').replaceChildren();
  for (const m of [...page.messages].reverse()) {
    const before = known.get(m.message_id);
    placeMessage(keepStatus(m, before), 'end');
  }
  // Messages that arrived by event while the page was on its way stay, last.
  for (const messageId of live) {
    const m = known.get(messageId);
    if (m && !state.messages.has(messageId)) placeMessage(m, 'end');
  }
  state.cursor = page.next_cursor;
  $('older').hidden = !page.next_cursor;
  scrollToEnd();
  markReadIfSeen();
}

async function loadOlder() {
  const id = state.current;
  if (!id || !state.cursor) return;
  const scroller = $('messages-scroll');
  const fromBottom = scroller.scrollHeight - scroller.scrollTop;
  let page;
  try {
    page = await api('GET', `/api/chat/conversations/${id}/messages?limit=${PAGE}&before=${state.cursor}`);
  } catch (e) {
    $('send-error').textContent = e.message;
    return;
  }
  if (state.current !== id) return;
  // Newest first: each goes before the ones already shown.
  for (const m of page.messages) {
    if (!state.messages.has(m.message_id)) placeMessage(m, 'start');
  }
  state.cursor = page.next_cursor;
  $('older').hidden = !page.next_cursor;
  scroller.scrollTop = scroller.scrollHeight - fromBottom;
}

// A page fetched before an event must not undo that event.
function keepStatus(m, known) {
  if (known && (RANK[m.status] ?? 0) < (RANK[known.status] ?? 0)) return { ...m, status: known.status };
  return m;
}

// Shows a message of the open conversation: replaced where it is, or added
// at the end (a new message) or the start (an older page).
function placeMessage(m, where) {
  state.messages.set(m.message_id, m);
  const list = $('messages');
  const node = renderMessage(m);
  const existing = list.querySelector(`[data-message="${CSS.escape(m.message_id)}"]`);
  if (existing) existing.replaceWith(node);
  else if (where === 'start') list.prepend(node);
  else list.append(node);
}

// A live message or a new status: replaces it, or appends it.
function upsertMessage(m, { quiet = false } = {}) {
  if (m.conversation_id !== state.current) return;
  m = keepStatus(m, state.messages.get(m.message_id));
  const scroller = $('messages-scroll');
  const atEnd = scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 40;
  const isNew = !state.messages.has(m.message_id);
  if (isNew) state.live.add(m.message_id);
  placeMessage(m, 'end');
  if (isNew && !quiet && (atEnd || m.is_outgoing)) scrollToEnd();
}

function renderMessage(m) {
  const c = currentConversation();
  const out = m.is_outgoing;
  const item = el('li', `message ${out ? 'out' : 'in'}`);
  item.dataset.message = m.message_id;
  item.dataset.status = m.status;
  if (!out && c && c.conversation_type === 'group') {
    const sender = el('span', 'sender', shortId(m.sender_peer_id));
    sender.title = m.sender_peer_id;
    item.append(sender);
  }
  item.append(el('div', 'bubble', m.content));
  const meta = el('div', 'meta');
  meta.append(el('time', '', formatTime(m.timestamp)));
  if (out) {
    const mark = el('span', `mark ${m.status}`, MARKS[m.status] || '?');
    mark.title = m.waiting_reason ? `${m.status}: ${m.waiting_reason}` : m.status;
    mark.setAttribute('aria-label', m.status);
    meta.append(mark);
  }
  item.append(meta);
  if (out && m.status === 'failed') {
    const failure = el('div', 'failure');
    failure.append(el('span', '', `Not delivered: ${m.failure_reason || 'no reason given'}`));
    // A retry sends a new copy; once sent, or once the group is left,
    // there is nothing more to retry here.
    if (state.retried.has(m.message_id)) {
      failure.append(el('span', 'retried', '(sent again below)'));
    } else if (!(c && c.left)) {
      const retry = el('button', 'small retry', 'Retry');
      retry.type = 'button';
      retry.addEventListener('click', () => retryMessage(m.message_id));
      failure.append(retry);
    }
    item.append(failure);
  }
  return item;
}

function scrollToEnd() {
  const scroller = $('messages-scroll');
  scroller.scrollTop = scroller.scrollHeight;
}

function growInput() {
  const input = $('input');
  input.style.height = 'auto';
  input.style.height = `${Math.min(input.scrollHeight, 160)}px`;
}

async function sendMessage(e) {
  e.preventDefault();
  const c = currentConversation();
  const input = $('input');
  const content = input.value;
  if (!c || !content.trim() || state.sending) return;
  state.sending = true;
  $('send').disabled = true;
  $('send-error').textContent = '';
  try {
    if (c.conversation_type === 'group') {
      const sent = await api('POST', `/api/chat/groups/${c.conversation_id}/messages`, { content });
      // The group answer is the ID; the message itself comes as an event,
      // or with the next page if the event came first.
      if (state.current === c.conversation_id && !state.messages.has(sent.message_id)) reloadMessages();
    } else {
      const sent = await api('POST', `/api/chat/conversations/${c.conversation_id}/messages`, { content });
      upsertMessage(sent.message);
    }
    // Only what was sent is cleared; anything typed since stays.
    if (input.value === content) {
      input.value = '';
      growInput();
    }
  } catch (err) {
    // The text stays in the box, so nothing typed is lost.
    $('send-error').textContent = err.message;
  } finally {
    state.sending = false;
    $('send').disabled = false;
  }
}

async function retryMessage(id) {
  try {
    const retried = await api('POST', `/api/chat/messages/${id}/retry`);
    state.retried.add(id);
    const old = state.messages.get(id);
    if (old) placeMessage(old, 'end');
    upsertMessage(retried.message);
  } catch (err) {
    $('send-error').textContent = err.message;
  }
}

// Messages are read when their conversation is open in a visible page.
async function markReadIfSeen() {
  const c = currentConversation();
  if (!c || document.visibilityState !== 'visible') return;
  // On a narrow window the members panel covers the messages.
  if (!$('members').hidden && window.matchMedia('(max-width: 720px)').matches) return;
  const unseen = [...state.messages.values()].some((m) => !m.is_outgoing && m.status !== 'read');
  if (!unseen && !c.unread_count) return;
  try {
    await api('POST', `/api/chat/conversations/${c.conversation_id}/read`);
  } catch (e) {
    return;
  }
  for (const m of state.messages.values()) {
    if (!m.is_outgoing && m.status !== 'read') {
      m.status = 'read';
      upsertMessage(m, { quiet: true });
    }
  }
  scheduleListRefresh();
}

// ---- Group members -----------------------------------------------------

async function loadMembers() {
  const id = state.current;
  try {
    const data = await api('GET', `/api/chat/groups/${id}/members`);
    if (state.current !== id) return;
    state.members = data.members;
  } catch (e) {
    state.members = [];
  }
  renderMembers();
  renderHeader();
}

function toggleMembers(show) {
  const panel = $('members');
  const visible = show === undefined ? panel.hidden : show;
  const wasVisible = !panel.hidden;
  panel.hidden = !visible;
  $('members-toggle').setAttribute('aria-expanded', String(visible));
  if (visible) $('members-close').focus();
  else if (wasVisible && !$('members-toggle').hidden) $('members-toggle').focus();
}

function renderMembers() {
  const c = currentConversation();
  const list = $('member-list');
  list.replaceChildren();
  const members = [...state.members].sort((a, b) => (b.is_admin - a.is_admin) || (a.left_at - b.left_at));
  for (const m of members) {
    const item = el('li', m.left_at ? 'gone' : '');
    item.dataset.peer = m.peer_id;
    const id = el('code', 'peer-id', shortId(m.peer_id));
    id.title = m.peer_id;
    item.append(id);
    if (m.peer_id === state.me.peer_id) item.append(el('span', 'tag', 'you'));
    if (m.is_admin) item.append(el('span', 'tag admin', 'admin'));
    if (m.left_at) item.append(el('span', 'tag left', 'left'));
    list.append(item);
  }
  const mine = state.members.find((m) => m.peer_id === state.me.peer_id);
  const stillIn = c && !c.left && mine && !mine.left_at;
  $('invite-form').hidden = !(stillIn && mine.is_admin);
  $('leave').hidden = !stillIn;
  renderHeader();
}

async function invite(e) {
  e.preventDefault();
  const peer = $('invite-peer').value.trim().toLowerCase();
  const error = $('invite-error');
  error.textContent = '';
  if (!PEER_ID.test(peer)) {
    error.textContent = 'A peer ID is 40 hexadecimal characters (0-9, a-f).';
    return;
  }
  try {
    const group = state.current;
    const data = await api('POST', `/api/chat/groups/${group}/invite`, { peer_id: peer });
    $('invite-peer').value = '';
    if (state.current !== group) return;
    state.members = data.members;
    renderMembers();
  } catch (err) {
    error.textContent = err.message;
  }
}

async function leaveGroup() {
  const c = currentConversation();
  if (!c) return;
  if (!window.confirm(`Leave "${c.group_name}"? You will no longer get its messages.`)) return;
  try {
    await api('POST', `/api/chat/groups/${c.conversation_id}/leave`);
  } catch (err) {
    $('invite-error').textContent = err.message;
    return;
  }
  await refreshConversations();
  await loadMembers();
}

start();
