// A real OpenID provider for the end-to-end OAuth tests: npm `oidc-provider` (a certified
// implementation) with dynamic client registration, PKCE and resource indicators (RFC 8707), issuing
// JWT access tokens whose audience is the resource the client asked for (the relay's /mcp URL).
//
// The login is automated: every interaction signs in $OIDC_ACCOUNT and consents to what was asked,
// so a test can drive the whole browser leg with an HTTP client that follows redirects.
//
// Environment: OIDC_PORT, OIDC_KEY (a file with the private signing JWK, ES256), OIDC_RESOURCE
// (the only resource it issues tokens for), OIDC_ACCOUNT (the `sub`), OIDC_ROLES (comma-separated,
// the `roles` claim), OIDC_TTL (access token lifetime, seconds). Prints one JSON line when ready.
import { readFileSync } from 'node:fs';
import http from 'node:http';
import process from 'node:process';
import { createRequire } from 'node:module';

const require = createRequire(import.meta.url);
const modules = process.env.CLOISTER_NODE_MODULES ?? new URL('../../node/node_modules/', import.meta.url).pathname;
const { default: Provider, errors } = await import(require.resolve('oidc-provider', { paths: [modules] }));

const port = Number(process.env.OIDC_PORT);
const issuer = `http://127.0.0.1:${port}`;
const resource = process.env.OIDC_RESOURCE;
const account = process.env.OIDC_ACCOUNT ?? 'oauth-bot';
const roles = (process.env.OIDC_ROLES ?? '').split(',').filter(Boolean);
const ttl = Number(process.env.OIDC_TTL ?? 600);
const key = JSON.parse(readFileSync(process.env.OIDC_KEY, 'utf8'));

const provider = new Provider(issuer, {
  jwks: { keys: [key] },
  // Its one key is ES256: registered clients default to it (oidc-provider's default is RS256).
  clientDefaults: { id_token_signed_response_alg: 'ES256', grant_types: ['authorization_code'], response_types: ['code'] },
  cookies: { keys: ['cloister-test-cookie-key-0123456789'] },
  findAccount: async (_ctx, sub) => ({ accountId: sub, claims: async () => ({ sub }) }),
  features: {
    devInteractions: { enabled: false },
    registration: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: async (_ctx, _client, oneOf) => oneOf ?? resource,
      useGrantedResource: async () => true,
      getResourceServerInfo: async (_ctx, indicator) => {
        if (indicator !== resource) throw new errors.InvalidTarget(`only ${resource} is served here`);
        return {
          scope: 'mcp',
          audience: indicator,
          accessTokenTTL: ttl,
          accessTokenFormat: 'jwt',
          jwt: { sign: { alg: 'ES256' } },
        };
      },
    },
  },
  scopes: ['openid', 'mcp'],
  // Refresh tokens for clients that registered for them (MCP clients do), so they renew silently.
  issueRefreshToken: async (_ctx, client) => client.grantTypeAllowed('refresh_token'),
  extraTokenClaims: async () => (roles.length ? { roles } : undefined),
  interactions: { url: (_ctx, interaction) => `/interaction/${interaction.uid}` },
  ttl: { AccessToken: ttl, AuthorizationCode: 60, Grant: 600, Interaction: 600, Session: 600, IdToken: 600 },
});

// Sign in and consent without a person: what a login page would do after a user clicked.
async function interact(req, res) {
  const details = await provider.interactionDetails(req, res);
  const { prompt, params, session } = details;
  if (prompt.name === 'login') {
    await provider.interactionFinished(req, res, { login: { accountId: account } }, { mergeWithLastSubmission: false });
    return;
  }
  const grant = details.grantId
    ? await provider.Grant.find(details.grantId)
    : new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
  const missing = prompt.details;
  if (missing.missingOIDCScope) grant.addOIDCScope(missing.missingOIDCScope.join(' '));
  if (missing.missingOIDCClaims) grant.addOIDCClaims(missing.missingOIDCClaims);
  for (const [indicator, scopes] of Object.entries(missing.missingResourceScopes ?? {})) {
    grant.addResourceScope(indicator, scopes.join(' '));
  }
  const grantId = await grant.save();
  await provider.interactionFinished(req, res, { consent: { grantId } }, { mergeWithLastSubmission: true });
}

const callback = provider.callback();
const server = http.createServer((req, res) => {
  if (req.url.startsWith('/interaction/')) {
    interact(req, res).catch((err) => {
      res.statusCode = 500;
      res.end(String(err));
    });
    return;
  }
  callback(req, res);
});
server.listen(port, '127.0.0.1', () => {
  process.stdout.write(`${JSON.stringify({ issuer })}\n`);
});
process.on('SIGTERM', () => server.close(() => process.exit(0)));
