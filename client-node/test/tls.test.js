'use strict';
// TLS and mutual TLS options against Triton's service served by @grpc/grpc-js over TLS, with
// a CA, a server certificate for 127.0.0.1 and a client certificate made by the openssl
// command (skipped without it). The served ensemble's own TLS is tested in Python
// (tests/test_serving_operations.py); this checks the Node client's side of it.

const test = require('node:test');
const assert = require('node:assert/strict');
const { execFileSync } = require('node:child_process');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');

const { ImageRAGTurboClient, NO_RETRY, ImageRAGTurboError } = require('..');
const { inferenceService } = require('../src/proto');

const hasOpenssl = (() => {
  try {
    execFileSync('openssl', ['version'], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
})();

/** A CA, a server certificate for 127.0.0.1 / localhost and a client certificate. */
function makeCerts() {
  const d = fs.mkdtempSync(path.join(os.tmpdir(), 'irt-node-certs-'));
  const ssl = (/** @type {string[]} */ ...args) => execFileSync('openssl', args, { cwd: d, stdio: 'ignore' });
  ssl('req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', 'ca.key', '-out', 'ca.crt',
    '-days', '2', '-subj', '/CN=imageragturbo-test-ca');
  fs.writeFileSync(path.join(d, 'san.ext'), 'subjectAltName=DNS:localhost,IP:127.0.0.1\n');
  for (const [name, ext] of [['server', ['-extfile', 'san.ext']], ['client', []]]) {
    ssl('req', '-newkey', 'rsa:2048', '-nodes', '-keyout', `${name}.key`, '-out', `${name}.csr`,
      '-subj', `/CN=${name}`);
    ssl('x509', '-req', '-in', `${name}.csr`, '-CA', 'ca.crt', '-CAkey', 'ca.key',
      '-CAcreateserial', '-out', `${name}.crt`, '-days', '2', ...ext);
  }
  return { dir: d, file: (/** @type {string} */ f) => path.join(d, f) };
}

/**
 * ServerLive over TLS; with `mutual`, the server requires a client certificate from the CA.
 * @param {{file: (f: string) => string}} certs
 * @param {boolean} mutual
 */
async function tlsServer(certs, mutual) {
  const server = new grpc.Server();
  server.addService(inferenceService().service, {
    ServerLive(/** @type {any} */ _call, /** @type {any} */ cb) { cb(null, { live: true }); },
  });
  const creds = grpc.ServerCredentials.createSsl(fs.readFileSync(certs.file('ca.crt')), [{
    private_key: fs.readFileSync(certs.file('server.key')),
    cert_chain: fs.readFileSync(certs.file('server.crt')),
  }], mutual);
  const port = await new Promise((resolve, reject) => server.bindAsync('127.0.0.1:0', creds,
    (err, p) => (err ? reject(err) : resolve(p))));
  // localhost (in the certificate too): Node warns when TLS is pointed at an IP address
  return { url: `localhost:${port}`, stop: () => server.forceShutdown() };
}

test('TLS: a client with the CA connects; plaintext and mutual TLS without a certificate do not',
  { skip: hasOpenssl ? false : 'the openssl command is needed to make test certificates' },
  async () => {
    const certs = makeCerts();
    const live = async (/** @type {string} */ url, /** @type {any} */ opts) => {
      const c = new ImageRAGTurboClient(url, { retry: NO_RETRY, ...opts });
      try {
        return await c.isLive({ timeoutMs: 3000 });
      } finally {
        await c.close();
      }
    };
    const one = await tlsServer(certs, false);
    try {
      assert.equal(await live(one.url, { rootCertificates: certs.file('ca.crt') }), true);
      assert.equal(await live(one.url, {}), false); // plaintext to a TLS server
    } finally {
      one.stop();
    }
    const two = await tlsServer(certs, true);
    try {
      assert.equal(await live(two.url, { rootCertificates: fs.readFileSync(certs.file('ca.crt')),
        privateKey: certs.file('client.key'), certificateChain: certs.file('client.crt') }), true);
      assert.equal(await live(two.url, { rootCertificates: certs.file('ca.crt') }), false);
      // and a refused call is a typed error
      const c = new ImageRAGTurboClient(two.url, { retry: NO_RETRY, timeoutMs: 3000,
        rootCertificates: certs.file('ca.crt') });
      await assert.rejects(c.modelMetadata(), ImageRAGTurboError);
      await c.close();
    } finally {
      two.stop();
      fs.rmSync(certs.dir, { recursive: true, force: true });
    }
  });
