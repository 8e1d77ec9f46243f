/**
 * A node:test reporter for tests/e2e/test_supabase_js.py: one JSON line per
 * finished test or suite (its name, file, nesting, whether it failed, and its
 * skip/todo directive), so the Python side can refuse skips and todos that
 * are not in its allow-list. It runs beside the spec reporter, which stays
 * the readable output.
 */
export default async function * resultsReporter (source) {
  for await (const event of source) {
    if (event.type !== 'test:pass' && event.type !== 'test:fail') continue
    const { name, nesting, file, skip, todo, details } = event.data
    yield JSON.stringify({
      name,
      file: file ?? null,
      nesting,
      failed: event.type === 'test:fail',
      skip: skip === undefined || skip === false ? null : skip,
      todo: todo === undefined || todo === false ? null : todo,
      suite: details?.type === 'suite'
    }) + '\n'
  }
}
