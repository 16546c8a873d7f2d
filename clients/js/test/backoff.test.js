// Backoff: full jitter, uniform in [0, min(max, base * 2^attempt)).
import { test } from 'node:test';
import assert from 'node:assert/strict';

import { backoffDelay, BACKOFF_BASE_MS, BACKOFF_MAX_MS, tokenSubject } from '../agentcast.js';
import { token } from '../testlib/harness.js';

test('the ceiling doubles per attempt from the base and stops at the maximum', () => {
  const top = 1 - Number.EPSILON;
  const ceilings = [0, 1, 2, 3, 4, 5, 6, 7, 20, 1000].map((a) => backoffDelay(a, { random: () => top }));
  const expected = [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000, 5000].map((c) => c * top);
  assert.deepEqual(ceilings, expected);
  assert.equal(BACKOFF_BASE_MS, 100);
  assert.equal(BACKOFF_MAX_MS, 5000);
});

test('full jitter: random 0 waits nothing, and delays are spread over the whole range', () => {
  assert.equal(backoffDelay(5, { random: () => 0 }), 0);
  assert.equal(backoffDelay(3, { random: () => 0.5 }), 400);
  assert.equal(backoffDelay(2, { base: 10, max: 25, random: () => 0.5 }), 12.5);
  for (const attempt of [0, 1, 4, 10]) {
    const ceiling = Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** attempt);
    const samples = Array.from({ length: 2000 }, () => backoffDelay(attempt));
    assert.ok(samples.every((d) => d >= 0 && d < ceiling), `attempt ${attempt}: outside [0, ${ceiling})`);
    // Full jitter, not "half jitter" or a fixed delay: both ends are reached.
    assert.ok(Math.min(...samples) < ceiling * 0.1, `attempt ${attempt}: nothing near 0`);
    assert.ok(Math.max(...samples) > ceiling * 0.9, `attempt ${attempt}: nothing near the ceiling`);
  }
});

test('the token subject keys the stored position', () => {
  assert.equal(tokenSubject(token('alice@x')), 'alice@x');
  assert.equal(tokenSubject('not a jwt'), undefined);
});
