// GitHub's own cache client (@actions/cache, v2 protocol) against a cache service:
//   node actions_cache.mjs save <key> <paths>          prints the entry id (-1: not saved)
//   node actions_cache.mjs restore <key> <paths> [restore-key...]   prints the matched key or ''
// <paths>: one path, or several separated by newlines (as in actions/cache's `path` input).
// It reads ACTIONS_CACHE_SERVICE_V2, ACTIONS_RESULTS_URL and ACTIONS_RUNTIME_TOKEN like an action.
import * as cache from '@actions/cache';

const [mode, key, pathArg, ...restoreKeys] = process.argv.slice(2);
const paths = (pathArg || '').split('\n').filter(Boolean);
if (mode === 'save') {
  console.log(`result=${await cache.saveCache(paths, key)}`);
} else if (mode === 'restore') {
  console.log(`result=${(await cache.restoreCache(paths, key, restoreKeys)) ?? ''}`);
} else {
  console.error('usage: actions_cache.mjs save|restore <key> <path> [restore-key...]');
  process.exit(2);
}
