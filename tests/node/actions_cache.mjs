// GitHub's own cache client (@actions/cache, v2 protocol) against a cache service:
//   node actions_cache.mjs save <key> <path>          prints the entry id (-1: not saved)
//   node actions_cache.mjs restore <key> <path> [restore-key...]   prints the matched key or ''
// It reads ACTIONS_CACHE_SERVICE_V2, ACTIONS_RESULTS_URL and ACTIONS_RUNTIME_TOKEN like an action.
import * as cache from '@actions/cache';

const [mode, key, path, ...restoreKeys] = process.argv.slice(2);
if (mode === 'save') {
  console.log(`result=${await cache.saveCache([path], key)}`);
} else if (mode === 'restore') {
  console.log(`result=${(await cache.restoreCache([path], key, restoreKeys)) ?? ''}`);
} else {
  console.error('usage: actions_cache.mjs save|restore <key> <path> [restore-key...]');
  process.exit(2);
}
