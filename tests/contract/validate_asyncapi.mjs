// Parse and validate an AsyncAPI document with AsyncAPI's own parser (the rules
// Studio and the CLI apply). Prints every diagnostic as one JSON line; exits 1
// when any is an error, 2 when the file cannot be read.
import { readFileSync } from "node:fs";
import { resolve } from "node:path";
import { Parser, DiagnosticSeverity } from "@asyncapi/parser";

const path = resolve(process.argv[2] ?? "asyncapi.yaml");
let text;
try {
  text = readFileSync(path, "utf8");
} catch (e) {
  console.error(`cannot read ${path}: ${e.message}`);
  process.exit(2);
}
const parser = new Parser();
const { document, diagnostics } = await parser.parse(text, { source: path });
const names = ["error", "warning", "information", "hint"];
for (const d of diagnostics) {
  console.log(JSON.stringify({ severity: names[d.severity], code: d.code, message: d.message, path: d.path.join(".") }));
}
const errors = diagnostics.filter((d) => d.severity === DiagnosticSeverity.Error);
if (!document || errors.length) process.exit(1);
console.log(JSON.stringify({ ok: true, channels: document.channels().length, operations: document.operations().length,
                             messages: document.components().messages().length }));
