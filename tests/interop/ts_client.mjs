// An independent MCP client for the interoperability tests: the official TypeScript SDK
// (`@modelcontextprotocol/sdk`), its StreamableHTTPClientTransport and an OAuthClientProvider.
//
// Usage: node ts_client.mjs '<json options>'
//   url          the proxy's MCP endpoint (the client starts from nothing but this URL)
//   redirectUri  the client's redirect URI (the test's browser stops there; nothing needs to listen)
//   stateFile    JSON file keeping the client registration and tokens between runs, as a real client's
//                storage would (a second run with stored tokens must not need the browser)
//   tool         tool to call with progress (default "progress"), toolArgs its arguments
//   clientName   the client_name it registers with (default "TypeScript SDK interop client")
//
// Protocol with the test, one JSON object per line:
//   stdout {"event":"authorize","url":…}  the test walks this URL in a browser, then writes the URL the
//   stdin  <redirect URL with code, state, iss>  browser landed on back as one line
//   stdout {"event":"progress",…} each progress notification as it arrives (with its arrival time)
//   stdout {"event":"result",…} per call, then {"event":"done",…} with what the SDK did; exit 0
//   stdout {"event":"error",…} and exit 1 on failure.

import { randomBytes } from 'node:crypto';
import { readFileSync, writeFileSync, existsSync } from 'node:fs';
import { createInterface } from 'node:readline';

import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { UnauthorizedError } from '@modelcontextprotocol/sdk/client/auth.js';
import { StreamableHTTPClientTransport } from '@modelcontextprotocol/sdk/client/streamableHttp.js';
import { CallToolResultSchema } from '@modelcontextprotocol/sdk/types.js';

const options = JSON.parse(process.argv[2] ?? '{}');
const started = Date.now();

function emit(event, details = {}) {
  process.stdout.write(`${JSON.stringify({ event, at: Date.now(), ...details })}\n`);
}

// stdin lines, read on demand: the browser walk happens in the test process.
const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();
async function nextLine() {
  const { value, done } = await lines.next();
  if (done) throw new Error('stdin closed before the authorization callback arrived');
  return value.trim();
}

/** Storage that survives the process, as a desktop client's keychain would. */
class FileStore {
  constructor(path) {
    this.path = path;
    this.data = path && existsSync(path) ? JSON.parse(readFileSync(path, 'utf8')) : {};
  }

  get(key) {
    return this.data[key];
  }

  set(key, value) {
    this.data[key] = value;
    if (this.path) writeFileSync(this.path, JSON.stringify(this.data, null, 2));
  }
}

class TestOAuthProvider {
  constructor(store, redirectUri) {
    this.store = store;
    this._redirectUri = redirectUri;
    this.authorizeUrls = [];
    this.savedTokens = 0;
    this.expectedState = undefined;
  }

  get redirectUrl() {
    return this._redirectUri;
  }

  get clientMetadata() {
    return {
      client_name: options.clientName ?? 'TypeScript SDK interop client',
      redirect_uris: [this._redirectUri],
      grant_types: ['authorization_code', 'refresh_token'],
      response_types: ['code'],
      token_endpoint_auth_method: 'none',
    };
  }

  state() {
    // The SDK sends whatever we return and leaves checking it to us (see finish()).
    this.expectedState = randomBytes(16).toString('base64url');
    return this.expectedState;
  }

  clientInformation() {
    return this.store.get('client');
  }

  saveClientInformation(info) {
    this.store.set('client', info);
  }

  tokens() {
    return this.store.get('tokens');
  }

  saveTokens(tokens) {
    this.savedTokens += 1;
    this.store.set('tokens', tokens);
  }

  redirectToAuthorization(url) {
    this.authorizeUrls.push(url.toString());
    emit('authorize', { url: url.toString() });
  }

  saveCodeVerifier(verifier) {
    this.store.set('verifier', verifier);
  }

  codeVerifier() {
    const verifier = this.store.get('verifier');
    if (!verifier) throw new Error('no code verifier saved');
    return verifier;
  }

  invalidateCredentials(scope) {
    emit('invalidate', { scope });
    if (scope === 'all' || scope === 'client') this.store.set('client', undefined);
    if (scope === 'all' || scope === 'tokens') this.store.set('tokens', undefined);
    if (scope === 'all' || scope === 'verifier') this.store.set('verifier', undefined);
  }
}

const store = new FileStore(options.stateFile);
const provider = new TestOAuthProvider(store, options.redirectUri);
const url = new URL(options.url);

function newClient() {
  const client = new Client({ name: 'oauthproxy-interop-ts', version: '1.0.0' }, { capabilities: {} });
  const transport = new StreamableHTTPClientTransport(url, { authProvider: provider });
  return { client, transport };
}

/** Complete an authorization the SDK started: wait for the browser's landing URL, check it, redeem the code. */
async function finish(transport) {
  const landed = new URL(await nextLine());
  const params = landed.searchParams;
  if (params.get('error')) {
    throw Object.assign(new Error(`authorization failed: ${params.get('error')}`), {
      oauthError: params.get('error'),
      oauthErrorDescription: params.get('error_description'),
      iss: params.get('iss'),
    });
  }
  if (params.get('state') !== provider.expectedState) throw new Error('state mismatch in the authorization response');
  // RFC 9207: the SDK does not check `iss`; a careful client does. The issuer is the MCP URL's origin here.
  if (params.get('iss') !== url.origin) throw new Error(`unexpected iss ${params.get('iss')}`);
  await transport.finishAuth(params.get('code'));
}

async function connect() {
  let { client, transport } = newClient();
  try {
    await client.connect(transport);
  } catch (error) {
    if (!(error instanceof UnauthorizedError)) throw error;
    await finish(transport);
    ({ client, transport } = newClient());
    await client.connect(transport);
  }
  return { client, transport };
}

async function main() {
  const { client, transport } = await connect();
  emit('connected', { sessionId: transport.sessionId ?? null, protocolVersion: transport.protocolVersion ?? null });

  const tools = await client.listTools();
  emit('tools', { names: tools.tools.map((tool) => tool.name) });

  const tool = options.tool ?? 'progress';
  const callStarted = Date.now();
  const result = await client.callTool({ name: tool, arguments: options.toolArgs ?? { steps: 3, pause: 0.4 } },
    CallToolResultSchema, {
      onprogress: (progress) => emit('progress', { progress: progress.progress, total: progress.total }),
      timeout: 30_000,
    });
  emit('result', { tool, started: callStarted, result });

  const whoami = await client.callTool({ name: 'whoami', arguments: {} });
  emit('result', { tool: 'whoami', result: whoami });

  await transport.terminateSession(); // DELETE with Mcp-Session-Id, as a client leaving politely does
  await client.close();
  emit('done', {
    authorizeUrls: provider.authorizeUrls,
    savedTokens: provider.savedTokens,
    clientId: store.get('client')?.client_id ?? null,
    elapsedMs: Date.now() - started,
  });
}

main().then(() => process.exit(0), (error) => {
  emit('error', {
    name: error?.name, message: String(error?.message ?? error), code: error?.code ?? null,
    oauthError: error?.oauthError ?? null, iss: error?.iss ?? null, authorizeUrls: provider.authorizeUrls,
  });
  process.exit(1);
});
