// Validates an AsyncAPI document with the AsyncAPI Initiative's own parser (its JSON Schema of the
// spec plus its rules). Prints each finding; exits 1 when any is an error.
import { readFileSync } from 'node:fs';
import { Parser } from '@asyncapi/parser';

const path = process.argv[2];
const parser = new Parser();
const { document, diagnostics } = await parser.parse(readFileSync(path, 'utf8'));
let errors = 0;
for (const d of diagnostics) {
  const level = ['error', 'warning', 'info', 'hint'][d.severity] ?? String(d.severity);
  if (d.severity === 0) errors += 1;
  console.log(`${level} ${d.code} ${d.path.join('.')}: ${d.message}`);
}
console.log(document ? `parsed: ${document.channels().length} channels, ${document.operations().length} operations` : 'not parsed');
process.exit(errors || !document ? 1 : 0);
