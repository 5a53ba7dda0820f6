// A client in another language that knows the service only from its contract:
// asyncapi.yaml (read with AsyncAPI's parser) and schemas/*.json (loaded into Ajv
// by $id). It takes every topic, key, correlation and payload from them, talks
// over KafkaJS, and prints one JSON summary line.
//
//   node node_client.mjs ASYNCAPI_YAML SCHEMAS_DIR BOOTSTRAP PREFIX
import { readFileSync, readdirSync } from "node:fs";
import { join, resolve } from "node:path";
import { Parser } from "@asyncapi/parser";
import Ajv2020 from "ajv/dist/2020.js";
import { Kafka, Partitioners, logLevel } from "kafkajs";

const [docPath, schemasDir, bootstrap, prefix = ""] = process.argv.slice(2);
const { document, diagnostics } = await new Parser().parse(readFileSync(docPath, "utf8"), { source: resolve(docPath) });
if (!document) throw new Error(`asyncapi.yaml does not parse: ${JSON.stringify(diagnostics)}`);

const ajv = new Ajv2020({ strict: false, allErrors: true });
for (const f of readdirSync(schemasDir).filter((f) => f.endsWith(".json"))) {
  ajv.addSchema(JSON.parse(readFileSync(join(schemasDir, f), "utf8")));
}
const ext = (msg, name) => msg.extensions().get(name)?.value();
const validatorOf = (msg) => ajv.getSchema(ext(msg, "x-schema-id"));
const topicOf = (channel) => channel.address().replace("{prefix}", prefix);
const pointer = (location) => location.split("#")[1].split("/").filter(Boolean);
const at = (obj, path) => path.reduce((o, k) => o?.[k], obj);

// the operation that receives queries and replies with answers, and the one that receives documents
const receives = document.operations().filterByReceive();
const ask = receives.find((op) => op.reply());
const index = receives.find((op) => op.messages().all()[0].name() === "Document");
const queryMsg = ask.messages().all()[0];
const answerMsg = ask.reply().messages().all()[0];
const docMsg = index.messages().all()[0];
const queriesTopic = topicOf(ask.channels().all()[0]);
const answersTopic = topicOf(ask.reply().channel());
const dlqTopic = queriesTopic + ".dlq";
const correlation = pointer(queryMsg.correlationId().location());
const answerCorrelation = pointer(answerMsg.correlationId().location());
const deadLetter = document.channels().all().find((c) => topicOf(c) === dlqTopic).messages().all()[0];

const records = (msg, payloads) => payloads.map((p) => {
  if (!validatorOf(msg)(p)) throw new Error(`${msg.name()} example invalid: ${ajv.errorsText(validatorOf(msg).errors)}`);
  return { key: String(p[ext(msg, "x-kafka-key-field")]), value: JSON.stringify(p) };
});
const docs = records(docMsg, docMsg.examples().all().map((e) => e.payload()));
const queries = records(queryMsg, queryMsg.examples().all().map((e) => e.payload()));
// a query the schema refuses, sent anyway: the service must say why, on the dead-letter topic
const bad = { query_id: "js-bad", text: 42 };
const badIsInvalid = !validatorOf(queryMsg)(bad);

const kafka = new Kafka({ clientId: "contract-js", brokers: [bootstrap], logLevel: logLevel.NOTHING });
const producer = kafka.producer({ createPartitioner: Partitioners.DefaultPartitioner });
const consumer = kafka.consumer({ groupId: `contract-js-${Date.now()}` });
await producer.connect();
await consumer.connect();
await consumer.subscribe({ topics: [answersTopic, dlqTopic], fromBeginning: true });

const wanted = new Set(queries.map((q) => at(JSON.parse(q.value), correlation)));
const answers = new Map();
const letters = [];
let invalid = [];
const done = new Promise((res) => {
  consumer.run({
    eachMessage: async ({ topic, message }) => {
      const body = JSON.parse(message.value.toString());
      if (topic === answersTopic) {
        const id = at(body, answerCorrelation);
        if (!validatorOf(answerMsg)(body)) invalid.push(ajv.errorsText(validatorOf(answerMsg).errors));
        if (message.key.toString() !== id) invalid.push(`answer ${id} keyed ${message.key}`);
        answers.set(id, body);
      } else {
        if (!validatorOf(deadLetter)(body)) invalid.push(ajv.errorsText(validatorOf(deadLetter).errors));
        letters.push({ key: message.key?.toString(), reason: body.reason });
      }
      if ([...wanted].every((id) => answers.has(id)) && letters.length >= 1) res();
    },
  });
});

await producer.send({ topic: topicOf(index.channels().all()[0]), messages: docs });
await new Promise((r) => setTimeout(r, 3000)); // the worker indexes them before the questions arrive
await producer.send({ topic: queriesTopic, messages: [...queries, { key: bad.query_id, value: JSON.stringify(bad) }] });
const timeout = new Promise((_, rej) => setTimeout(() => rej(new Error("timed out waiting for answers")), 90000));
try {
  await Promise.race([done, timeout]);
} finally {
  await consumer.disconnect();
  await producer.disconnect();
}
console.log(JSON.stringify({
  topics: { queries: queriesTopic, answers: answersTopic, dlq: dlqTopic },
  documents: docs.length, queries: queries.length, answered: [...wanted].filter((id) => answers.has(id)).length,
  with_sources: [...answers.values()].filter((a) => a.sources.length > 0).length,
  bad_is_invalid_locally: badIsInvalid, dead_letters: letters, invalid,
}));
