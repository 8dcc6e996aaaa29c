// A real OpenID Connect / OAuth 2.0 provider (panva's oidc-provider) for the
// oauthproxy test suite. Loopback only, in memory, no browser needed.
//
// Environment:
//   PORT              port to bind on 127.0.0.1 (required; it is part of the issuer)
//   ACCESS_TOKEN_TTL  access token lifetime in seconds (default 3600)
//   ID_TOKEN_CLAIMS   "1": put the scope-requested claims (email, name, ...) in
//                     the ID token too; default: only in /me, which is what
//                     oidc-provider does by default (conformIdTokenClaims)
//   REGISTRATION      "1": open dynamic client registration (RFC 7591) at
//                     /reg, advertised as registration_endpoint; default off
//   RESOURCE_INDICATORS
//                     "1": act as the authorization server of loopback
//                     resource servers (RFC 8707): a `resource` parameter
//                     naming an http(s) URL on 127.0.0.1 or localhost gets an
//                     opaque access token whose audience is that URL, with the
//                     RESOURCE_SCOPES the client asked for, checkable at the
//                     introspection endpoint (RFC 7662) and revocable; the
//                     token endpoint and refreshes keep the granted resource
//                     without repeating it. Default off: `resource` is refused
//                     with invalid_target, as before.
//   RESOURCE_SCOPES   the scopes such a resource server knows (space
//                     separated, default "mcp:tools")
//
// Prints exactly one line "READY <port>" on stdout once it is listening.
// (oidc-provider itself may print "oidc-provider NOTICE: ..." lines on stdout
// and warnings on stderr; look for the READY line, not the first line.)
//
// Besides the standard endpoints (see /.well-known/openid-configuration) it
// serves:
//   GET  /interaction/:uid   automatic login/consent (login_hint picks the user;
//                            "deny" -> access_denied, "error" -> server_error)
//   GET  /user, /user/emails GitHub-shaped user API (Bearer or "token" auth)
//   POST /test/clients       register a client {client_id, client_secret,
//                            redirect_uris, token_endpoint_auth_method?, ...}
//   GET  /test/stats         token endpoint counters
//   POST /test/stats/reset
//   POST /test/failure       {mode: null|"refresh_invalid_grant"|
//                            "refresh_server_error"|"code_server_error"|
//                            "token_delay", delay_ms?}
//   POST /test/users         add (or replace) a user {login, email, name,
//                            emailVerified?}: providers that send odd claims
//   GET  /test/endpoint-stats  registration, introspection and revocation
//                            request counters (reset with /test/stats/reset)
//   POST /test/revoke-grants {account_id, client_id?}: revoke every token the
//                            provider issued to that account (for that client),
//                            as a user revoking an app at the provider would
//
// POST /test/clients also takes default_resource (RESOURCE_INDICATORS only):
// the resource an authorization request of that client is for when it names
// none (an authorization server that knows which API a client calls).

import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';

import Provider, { errors, interactionPolicy } from 'oidc-provider';

const HOST = '127.0.0.1';
const PORT = Number.parseInt(process.env.PORT ?? '', 10);
const ACCESS_TOKEN_TTL = Number.parseInt(process.env.ACCESS_TOKEN_TTL ?? '3600', 10);
const ID_TOKEN_CLAIMS = process.env.ID_TOKEN_CLAIMS === '1';
const REGISTRATION = process.env.REGISTRATION === '1';
const RESOURCE_INDICATORS = process.env.RESOURCE_INDICATORS === '1';
const RESOURCE_SCOPES = (process.env.RESOURCE_SCOPES ?? 'mcp:tools').split(' ').filter(Boolean).join(' ');

if (!Number.isInteger(PORT) || PORT <= 0 || PORT > 65535) {
  throw new Error(`invalid PORT: ${process.env.PORT}`);
}
if (!Number.isInteger(ACCESS_TOKEN_TTL) || ACCESS_TOKEN_TTL <= 0) {
  throw new Error(`invalid ACCESS_TOKEN_TTL: ${process.env.ACCESS_TOKEN_TTL}`);
}

// ---------------------------------------------------------------------------
// Users
// ---------------------------------------------------------------------------

const USERS = new Map(
  [
    {
      id: 1001, login: 'alice', email: 'alice@example.com', name: 'Alice Liddell',
      emailVerified: true, publicEmail: true,
    },
    {
      // bob keeps his email private, as GitHub users can: /user says email null.
      id: 1002, login: 'bob', email: 'bob@example.org', name: 'Bob Builder',
      emailVerified: true, publicEmail: false,
    },
    {
      id: 1003, login: 'carol', email: 'carol@outsider.test', name: 'Carol Outsider',
      emailVerified: true, publicEmail: true,
    },
    {
      // dave never verified his address.
      id: 1004, login: 'dave', email: 'dave@example.com', name: 'Dave Unverified',
      emailVerified: false, publicEmail: true,
    },
    {
      // erin's provider says nothing about verification: no email_verified claim at all.
      id: 1005, login: 'erin', email: 'erin@example.com', name: 'Erin Unconfirmed',
      emailVerified: undefined, publicEmail: true,
    },
  ].map((user) => [user.login, user]),
);

// login_hint may name the account id ("bob") or its email ("bob@example.org").
function userForHint(hint) {
  if (USERS.has(hint)) return USERS.get(hint);
  for (const user of USERS.values()) {
    if (user.email === hint) return user;
  }
  return undefined;
}

async function findAccount(_ctx, sub) {
  const user = USERS.get(sub);
  if (!user) return undefined;
  return {
    accountId: user.login,
    // oidc-provider filters these by the granted scopes/claims.
    async claims() {
      return {
        sub: user.login,
        email: user.email,
        email_verified: user.emailVerified,
        name: user.name,
        preferred_username: user.login,
      };
    },
  };
}

// ---------------------------------------------------------------------------
// In-memory adapter (no LRU eviction, unlike oidc-provider's bundled one, so
// that registered clients and tokens survive a long test session).
// ---------------------------------------------------------------------------

const STORE = new Map(); // key -> { payload, expiresAt (ms) | undefined }
const GRANTABLE = new Set([
  'AccessToken', 'AuthorizationCode', 'RefreshToken', 'DeviceCode',
  'BackchannelAuthenticationRequest',
]);

function storeGet(key) {
  const entry = STORE.get(key);
  if (!entry) return undefined;
  if (entry.expiresAt !== undefined && entry.expiresAt <= Date.now()) {
    STORE.delete(key);
    return undefined;
  }
  return entry.value;
}

function storeSet(key, value, expiresIn) {
  const expiresAt = typeof expiresIn === 'number' ? Date.now() + expiresIn * 1000 : undefined;
  STORE.set(key, { value, expiresAt });
}

class MemoryAdapter {
  constructor(model) {
    this.model = model;
  }

  key(id) {
    return `${this.model}:${id}`;
  }

  async upsert(id, payload, expiresIn) {
    const key = this.key(id);
    if (this.model === 'Session') {
      storeSet(`sessionUid:${payload.uid}`, id, expiresIn);
    }
    if (payload.userCode) {
      storeSet(`userCode:${payload.userCode}`, id, expiresIn);
    }
    if (GRANTABLE.has(this.model) && payload.grantId) {
      const grantKey = `grant:${payload.grantId}`;
      const members = storeGet(grantKey) ?? new Set();
      members.add(key);
      STORE.set(grantKey, { value: members, expiresAt: undefined });
    }
    storeSet(key, payload, expiresIn);
  }

  async find(id) {
    return storeGet(this.key(id));
  }

  async findByUid(uid) {
    const id = storeGet(`sessionUid:${uid}`);
    return id === undefined ? undefined : this.find(id);
  }

  async findByUserCode(userCode) {
    const id = storeGet(`userCode:${userCode}`);
    return id === undefined ? undefined : this.find(id);
  }

  async consume(id) {
    const payload = storeGet(this.key(id));
    if (payload) payload.consumed = Math.floor(Date.now() / 1000);
  }

  async destroy(id) {
    STORE.delete(this.key(id));
  }

  async revokeByGrantId(grantId) {
    const grantKey = `grant:${grantId}`;
    for (const key of storeGet(grantKey) ?? []) {
      STORE.delete(key);
    }
    STORE.delete(grantKey);
  }
}

// ---------------------------------------------------------------------------
// Interaction policy: the stock login/consent prompts, plus "a login_hint that
// names someone other than the signed-in user forces a new login" so that one
// cookie jar can switch users (and "deny"/"error" always reach the handler).
// ---------------------------------------------------------------------------

const policy = interactionPolicy.base();
policy.get('login').checks.add(
  new interactionPolicy.Check(
    'login_hint_mismatch',
    'login_hint does not match the authenticated End-User',
    (ctx) => {
      const { oidc } = ctx;
      const hint = oidc.params.login_hint;
      if (hint === undefined || oidc.result?.login) return interactionPolicy.Check.NO_NEED_TO_PROMPT;
      const accountId = oidc.session.accountId;
      if (accountId === undefined) return interactionPolicy.Check.REQUEST_PROMPT;
      const user = userForHint(hint);
      return user?.login === accountId
        ? interactionPolicy.Check.NO_NEED_TO_PROMPT
        : interactionPolicy.Check.REQUEST_PROMPT;
    },
  ),
);

// ---------------------------------------------------------------------------
// Resource indicators (RESOURCE_INDICATORS=1): access tokens for a resource
// server, e.g. an MCP server that does its own authorization.
// ---------------------------------------------------------------------------

// client_id -> the resource its authorization requests are for by default.
const DEFAULT_RESOURCES = new Map();

function isLoopbackResource(indicator) {
  const url = URL.parse(indicator);
  return (
    url !== null
    && (url.protocol === 'http:' || url.protocol === 'https:')
    && (url.hostname === '127.0.0.1' || url.hostname === 'localhost')
    && !url.hash
  );
}

function resourceIndicatorsFeature() {
  return {
    enabled: true,
    defaultResource: async (_ctx, client, oneOf) => oneOf ?? DEFAULT_RESOURCES.get(client?.clientId),
    // RFC 8707 §2.2 lets a client repeat `resource` at the token endpoint; one
    // that does not (or a refresh) still gets a token for the resource granted.
    useGrantedResource: async () => true,
    getResourceServerInfo: async (_ctx, indicator) => {
      if (!isLoopbackResource(indicator)) {
        throw new errors.InvalidTarget(`unknown resource server ${indicator}`);
      }
      // Opaque (not JWT): oidc-provider can neither introspect nor revoke its
      // JWT access tokens, and a resource server that introspects sees a
      // revocation at once.
      return {
        scope: RESOURCE_SCOPES,
        audience: indicator,
        accessTokenTTL: ACCESS_TOKEN_TTL,
        accessTokenFormat: 'opaque',
      };
    },
  };
}

// ---------------------------------------------------------------------------
// Provider
// ---------------------------------------------------------------------------

const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
const signingKey = { ...privateKey.export({ format: 'jwk' }), kid: 'test-rs256', alg: 'RS256', use: 'sig' };

const issuer = `http://${HOST}:${PORT}`;

const configuration = {
  adapter: MemoryAdapter,
  findAccount,
  jwks: { keys: [signingKey] },
  cookies: { keys: [randomBytes(32).toString('base64url')] },
  scopes: [
    'openid', 'offline_access', 'email', 'profile', 'read:user', 'user:email',
    // Known here too, so that a client may register with them (RFC 7591 `scope`: oidc-provider accepts only
    // these); a token carries them for a resource server only when issued for it.
    ...(RESOURCE_INDICATORS ? RESOURCE_SCOPES.split(' ') : []),
  ],
  claims: {
    acr: null,
    auth_time: null,
    iss: null,
    sid: null,
    openid: ['sub'],
    email: ['email', 'email_verified'],
    profile: ['name', 'preferred_username'],
  },
  conformIdTokenClaims: !ID_TOKEN_CLAIMS,
  clientDefaults: {
    grant_types: ['authorization_code', 'refresh_token'],
    response_types: ['code'],
    token_endpoint_auth_method: 'client_secret_basic',
    id_token_signed_response_alg: 'RS256',
  },
  responseTypes: ['code'],
  pkce: {
    // Allowed (S256 is the only method oidc-provider supports) for every
    // client, required only for public clients (oidc-provider's default).
    required: (_ctx, client) => client.clientAuthMethod === 'none',
  },
  // Refresh tokens for every client allowed to use them, with or without
  // offline_access / prompt=consent.
  issueRefreshToken: async (_ctx, client) => client.grantTypeAllowed('refresh_token'),
  // Tokens outlive the provider's browser session (there is no browser).
  expiresWithSession: async () => false,
  interactions: {
    policy,
    url: (_ctx, interaction) => `/interaction/${interaction.uid}`,
  },
  features: {
    devInteractions: { enabled: false },
    revocation: { enabled: true },
    introspection: { enabled: true },
    userinfo: { enabled: true },
    // Open registration: no initial access token, as MCP clients expect.
    registration: { enabled: REGISTRATION },
    ...(RESOURCE_INDICATORS ? { resourceIndicators: resourceIndicatorsFeature() } : {}),
  },
  ttl: {
    AccessToken: () => ACCESS_TOKEN_TTL,
    AuthorizationCode: 60,
    IdToken: 3600,
    RefreshToken: 14 * 24 * 3600,
    Interaction: 3600,
    Session: 14 * 24 * 3600,
    Grant: 14 * 24 * 3600,
  },
  renderError: async (ctx, out) => {
    ctx.type = 'json';
    ctx.body = out;
  },
};

const provider = new Provider(issuer, configuration);

// ---------------------------------------------------------------------------
// Small koa helpers
// ---------------------------------------------------------------------------

async function readRawBody(req, limit = 64 * 1024) {
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > limit) throw new Error('request body too large');
    chunks.push(chunk);
  }
  return Buffer.concat(chunks, size);
}

async function readJson(ctx) {
  const raw = (await readRawBody(ctx.req)).toString('utf8');
  if (!raw.trim()) return {};
  return JSON.parse(raw);
}

function json(ctx, status, body) {
  ctx.status = status;
  ctx.type = 'application/json';
  ctx.set('Cache-Control', 'no-store');
  ctx.body = body;
}

// ---------------------------------------------------------------------------
// Test controls: token endpoint statistics and failure injection
// ---------------------------------------------------------------------------

const FAILURE_MODES = new Set([null, 'refresh_invalid_grant', 'refresh_server_error', 'code_server_error', 'token_delay']);

function emptyStats() {
  return { token_requests: 0, refresh_requests: 0, authorization_code_requests: 0 };
}

let stats = emptyStats();
let failure = { mode: null, delay_ms: 0 };

// Kept apart from `stats`, whose exact shape tests compare.
function emptyEndpointStats() {
  return { registration_requests: 0, introspection_requests: 0, revocation_requests: 0 };
}

let endpointStats = emptyEndpointStats();

provider.use(async (ctx, next) => {
  if (ctx.method === 'POST') {
    if (REGISTRATION && ctx.path === provider.pathFor('registration')) endpointStats.registration_requests += 1;
    if (ctx.path === provider.pathFor('introspection')) endpointStats.introspection_requests += 1;
    if (ctx.path === provider.pathFor('revocation')) endpointStats.revocation_requests += 1;
  }
  return next();
});

// Every token of `accountId` (issued to `clientId` when given), and their grants.
async function revokeGrants(accountId, clientId) {
  const grantIds = new Set();
  for (const [key, entry] of STORE) {
    const [model] = key.split(':', 1);
    const payload = entry.value;
    if (!GRANTABLE.has(model) || payload?.accountId !== accountId) continue;
    if (clientId !== undefined && payload.clientId !== clientId) continue;
    if (payload.grantId) grantIds.add(payload.grantId);
  }
  for (const grantId of grantIds) {
    // The adapter indexes every token of a grant, whatever its model.
    await new MemoryAdapter('AccessToken').revokeByGrantId(grantId);
    await new MemoryAdapter('Grant').destroy(grantId);
  }
  return grantIds.size;
}

provider.use(async (ctx, next) => {
  if (ctx.method !== 'POST' || ctx.path !== provider.pathFor('token')) {
    return next();
  }

  // Read the form body ourselves to see grant_type before oidc-provider runs;
  // oidc-provider then uses the already-read body (ctx.req.body). Non-form
  // bodies are left alone for oidc-provider to refuse.
  let grantType;
  if (ctx.is('application/x-www-form-urlencoded')) {
    const raw = await readRawBody(ctx.req);
    ctx.req.body = raw;
    grantType = new URLSearchParams(raw.toString('utf8')).get('grant_type');
  }

  stats.token_requests += 1;
  if (grantType === 'refresh_token') stats.refresh_requests += 1;
  if (grantType === 'authorization_code') stats.authorization_code_requests += 1;

  const { mode, delay_ms: delayMs } = failure;
  if (mode === 'token_delay' && delayMs > 0) {
    await sleep(delayMs);
  }
  if (grantType === 'refresh_token' && mode === 'refresh_invalid_grant') {
    return json(ctx, 400, {
      error: 'invalid_grant',
      error_description: 'grant request is invalid (injected failure: refresh_invalid_grant)',
    });
  }
  if (grantType === 'refresh_token' && mode === 'refresh_server_error') {
    return json(ctx, 503, {
      error: 'server_error',
      error_description: 'temporarily unavailable (injected failure: refresh_server_error)',
    });
  }
  if (grantType === 'authorization_code' && mode === 'code_server_error') {
    ctx.status = 500;
    ctx.body = 'Internal Server Error (injected failure: code_server_error)';
    return undefined;
  }
  return next();
});

provider.use(async (ctx, next) => {
  if (!ctx.path.startsWith('/test/')) return next();

  if (ctx.path === '/test/stats' && ctx.method === 'GET') {
    return json(ctx, 200, stats);
  }
  if (ctx.path === '/test/stats/reset' && ctx.method === 'POST') {
    stats = emptyStats();
    endpointStats = emptyEndpointStats();
    return json(ctx, 200, stats);
  }
  if (ctx.path === '/test/endpoint-stats' && ctx.method === 'GET') {
    return json(ctx, 200, endpointStats);
  }
  if (ctx.path === '/test/revoke-grants' && ctx.method === 'POST') {
    let body;
    try {
      body = await readJson(ctx);
    } catch (err) {
      return json(ctx, 400, { error: 'invalid_request', error_description: String(err.message) });
    }
    if (typeof body.account_id !== 'string' || !body.account_id) {
      return json(ctx, 400, { error: 'invalid_request', error_description: 'account_id is required' });
    }
    if (body.client_id !== undefined && typeof body.client_id !== 'string') {
      return json(ctx, 400, { error: 'invalid_request', error_description: 'client_id must be a string' });
    }
    return json(ctx, 200, { revoked_grants: await revokeGrants(body.account_id, body.client_id) });
  }
  if (ctx.path === '/test/failure' && ctx.method === 'GET') {
    return json(ctx, 200, failure);
  }
  if (ctx.path === '/test/failure' && ctx.method === 'POST') {
    let body;
    try {
      body = await readJson(ctx);
    } catch (err) {
      return json(ctx, 400, { error: 'invalid_request', error_description: String(err.message) });
    }
    const mode = body.mode ?? null;
    const delayMs = body.delay_ms ?? 0;
    if (!FAILURE_MODES.has(mode)) {
      return json(ctx, 400, { error: 'invalid_request', error_description: `unknown mode ${mode}` });
    }
    if (!Number.isInteger(delayMs) || delayMs < 0) {
      return json(ctx, 400, { error: 'invalid_request', error_description: 'delay_ms must be a non-negative integer' });
    }
    failure = { mode, delay_ms: delayMs };
    return json(ctx, 200, failure);
  }
  if (ctx.path === '/test/users' && ctx.method === 'POST') {
    let body;
    try {
      body = await readJson(ctx);
    } catch (err) {
      return json(ctx, 400, { error: 'invalid_request', error_description: String(err.message) });
    }
    if (typeof body.login !== 'string' || !body.login) {
      return json(ctx, 400, { error: 'invalid_request', error_description: 'login is required' });
    }
    const user = { id: 2000 + USERS.size, emailVerified: true, publicEmail: true, ...body };
    USERS.set(user.login, user);
    return json(ctx, 201, user);
  }
  if (ctx.path === '/test/clients' && ctx.method === 'POST') {
    let body;
    try {
      body = await readJson(ctx);
    } catch (err) {
      return json(ctx, 400, { error: 'invalid_request', error_description: String(err.message) });
    }
    const { default_resource: defaultResource, ...clientMetadata } = body;
    if (defaultResource !== undefined && !(RESOURCE_INDICATORS && typeof defaultResource === 'string'
      && isLoopbackResource(defaultResource))) {
      return json(ctx, 400, {
        error: 'invalid_client_metadata',
        error_description: 'default_resource needs RESOURCE_INDICATORS=1 and a loopback http(s) URL',
      });
    }
    const metadata = {
      grant_types: ['authorization_code', 'refresh_token'],
      response_types: ['code'],
      token_endpoint_auth_method: 'client_secret_basic',
      ...clientMetadata,
    };
    if (metadata.token_endpoint_auth_method === 'none') delete metadata.client_secret;
    try {
      await provider.Client.validate(metadata);
    } catch (err) {
      return json(ctx, 400, {
        error: err.error ?? 'invalid_client_metadata',
        error_description: err.error_description ?? String(err.message),
      });
    }
    await new MemoryAdapter('Client').upsert(metadata.client_id, metadata);
    if (defaultResource === undefined) DEFAULT_RESOURCES.delete(metadata.client_id);
    else DEFAULT_RESOURCES.set(metadata.client_id, defaultResource);
    const client = await provider.Client.find(metadata.client_id);
    return json(ctx, 201, client.metadata());
  }
  return json(ctx, 404, { error: 'not_found' });
});

// ---------------------------------------------------------------------------
// GitHub-shaped user API, backed by the provider's opaque access tokens
// ---------------------------------------------------------------------------

function githubUnauthorized(ctx) {
  ctx.set('WWW-Authenticate', 'Bearer realm="GitHub"');
  json(ctx, 401, {
    message: 'Bad credentials',
    documentation_url: 'https://docs.github.com/rest',
    status: '401',
  });
}

provider.use(async (ctx, next) => {
  if (ctx.path !== '/user' && ctx.path !== '/user/emails') return next();
  if (ctx.method !== 'GET') return json(ctx, 405, { message: 'Method Not Allowed' });

  const match = /^(?:bearer|token)\s+(\S+)\s*$/i.exec(ctx.get('authorization'));
  if (!match) return githubUnauthorized(ctx);

  let token;
  try {
    token = await provider.AccessToken.find(match[1]);
  } catch {
    token = undefined;
  }
  const user = token?.accountId ? USERS.get(token.accountId) : undefined;
  if (!token || !user) return githubUnauthorized(ctx);

  if (ctx.path === '/user') {
    return json(ctx, 200, {
      id: user.id,
      login: user.login,
      node_id: `U_${user.id}`,
      type: 'User',
      name: user.name,
      email: user.publicEmail ? user.email : null,
    });
  }
  return json(ctx, 200, [
    {
      email: user.email,
      primary: true,
      verified: user.emailVerified,
      visibility: user.publicEmail ? 'public' : 'private',
    },
    {
      email: `old.${user.login}@legacy.example.net`,
      primary: false,
      verified: true,
      visibility: null,
    },
  ]);
});

// ---------------------------------------------------------------------------
// Interactions: no browser, so finish every prompt at once and redirect (302).
// ---------------------------------------------------------------------------

async function finishInteraction(ctx, result) {
  const returnTo = await provider.interactionResult(ctx.req, ctx.res, result, {
    mergeWithLastSubmission: false,
  });
  ctx.status = 302;
  ctx.redirect(returnTo);
}

provider.use(async (ctx, next) => {
  const match = /^\/interaction\/([^/]+)$/.exec(ctx.path);
  if (!match || ctx.method !== 'GET') return next();

  let details;
  try {
    details = await provider.interactionDetails(ctx.req, ctx.res);
  } catch (err) {
    return json(ctx, 400, {
      error: err.error ?? 'invalid_request',
      error_description: err.error_description ?? String(err.message),
    });
  }
  if (details.uid !== match[1]) {
    return json(ctx, 400, { error: 'invalid_request', error_description: 'interaction uid mismatch' });
  }

  const { prompt, params, session } = details;
  const hint = params.login_hint ?? 'alice';

  if (hint === 'deny') {
    return finishInteraction(ctx, { error: 'access_denied', error_description: 'The user denied the request' });
  }
  if (hint === 'error') {
    return finishInteraction(ctx, { error: 'server_error', error_description: 'The provider failed on purpose' });
  }

  if (prompt.name === 'login') {
    const user = userForHint(hint);
    if (!user) {
      return finishInteraction(ctx, { error: 'access_denied', error_description: `unknown user ${hint}` });
    }
    if (session?.accountId && session.accountId !== user.login) {
      // Switching users in one cookie jar. oidc-provider would answer the
      // resume with an auto-submitting logout form (a browser-only step), so
      // sign the previous user out here instead: detach the interaction from
      // the old browser session, then drop that session. Tokens already
      // issued to the previous user stay valid.
      const previous = await provider.Session.findByUid(session.uid);
      delete details.session;
      await details.save(details.exp - Math.floor(Date.now() / 1000));
      await previous?.destroy();
    }
    return finishInteraction(ctx, { login: { accountId: user.login, remember: true } });
  }

  if (prompt.name === 'consent') {
    const { missingOIDCScope, missingOIDCClaims, missingResourceScopes } = prompt.details;
    let grant;
    if (details.grantId) {
      grant = await provider.Grant.find(details.grantId);
    }
    grant ??= new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
    if (missingOIDCScope) grant.addOIDCScope(missingOIDCScope.join(' '));
    if (missingOIDCClaims) grant.addOIDCClaims(missingOIDCClaims);
    for (const [indicator, scopes] of Object.entries(missingResourceScopes ?? {})) {
      grant.addResourceScope(indicator, scopes.join(' '));
    }
    const grantId = await grant.save();
    return finishInteraction(ctx, { consent: { grantId } });
  }

  return finishInteraction(ctx, {
    error: 'server_error',
    error_description: `unsupported prompt ${prompt.name}`,
  });
});

// ---------------------------------------------------------------------------

provider.on('server_error', (_ctx, err) => {
  console.error('oidc-provider server_error:', err);
});

const server = provider.listen(PORT, HOST, () => {
  const { port } = server.address();
  process.stdout.write(`READY ${port}\n`);
});

function shutdown() {
  server.close(() => process.exit(0));
  setTimeout(() => process.exit(0), 2000).unref();
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);
