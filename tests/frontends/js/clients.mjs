// The real JS clients against a live server: `node clients.mjs <baseURL> <apiKey>`.
// Prints one JSON object with what each client saw; tests/frontends/test_frontends_js.py checks it.
import OpenAI from 'openai';
import { ChatOpenAI } from '@langchain/openai';

const [baseURL, apiKey] = process.argv.slice(2);
const MODEL = 'proxy-tuned';
const user = (content) => [{ role: 'user', content }];
const out = {};

async function caught(fn) {
  try {
    await fn();
    return null;
  } catch (error) {
    return { name: error.constructor.name, status: error.status ?? null, code: error.code ?? null,
             message: String(error.message) };
  }
}

const client = new OpenAI({ baseURL, apiKey, maxRetries: 0 });

// Model picker (LibreChat `models.fetch`, any SDK-based frontend).
out.models = (await client.models.list()).data.map((m) => m.id);

// Old LibreChat: chat.completions.stream() and finalChatCompletion(), which refuses a stream without a role
// or a finish_reason.
const helper = client.chat.completions.stream({
  model: MODEL, messages: user('Hello!'), max_tokens: 8, temperature: 0.8, top_p: 1, presence_penalty: 1,
  frequency_penalty: 0, stop: ['\nUser:'], user: 'u-1', stream_options: { include_usage: true }, alpha: 1.0,
});
let helperText = '';
helper.on('content', (delta) => { helperText += delta; });
const final = await helper.finalChatCompletion();
out.helper = { text: helperText, role: final.choices[0].message.role, content: final.choices[0].message.content,
               finish_reason: final.choices[0].finish_reason, usage: final.usage ?? null };

// Raw iteration over create({stream: true}): the chunks as the SDK's Stream yields them.
const stream = await client.chat.completions.create({ model: MODEL, messages: user('hi'), stream: true, max_tokens: 8 });
out.chunks = [];
for await (const chunk of stream) out.chunks.push(chunk);

// Title generation: not streamed.
const title = await client.chat.completions.create({
  model: `${MODEL}:expert`, messages: [{ role: 'system', content: 'Please generate a concise title.' }],
  max_tokens: 16, temperature: 0.2, presence_penalty: 0, frequency_penalty: 0,
});
out.title = { model: title.model, content: title.choices[0].message.content, usage: title.usage };

// Errors as the SDK raises them.
out.wrongKey = await caught(() => new OpenAI({ baseURL, apiKey: 'sk-wrong', maxRetries: 0 }).models.list());
out.unknownModel = await caught(() => client.chat.completions.create({ model: 'gpt-4o', messages: user('hi') }));
out.badPart = await caught(() => client.chat.completions.create({
  model: MODEL, messages: [{ role: 'user', content: [{ type: 'image_url', image_url: { url: 'data:,' } }] }],
}));

// LibreChat's agents endpoint: LangChain ChatOpenAI with addParams as modelKwargs.
const options = { model: MODEL, temperature: 0.7, topP: 0.9, frequencyPenalty: 0.1, presencePenalty: 0.2,
                  user: 'u-1', maxTokens: 8, modelKwargs: { alpha: 0.5 }, apiKey, configuration: { baseURL },
                  maxRetries: 0 };
const streaming = new ChatOpenAI({ ...options, streaming: true });
let lcText = '';
let lcUsage = null;
for await (const chunk of await streaming.stream([['system', 'You are helpful.'], ['human', 'Hello']])) {
  lcText += chunk.content;
  if (chunk.usage_metadata) lcUsage = chunk.usage_metadata;
}
out.langchainStream = { text: lcText, usage: lcUsage };
const titled = await new ChatOpenAI({ ...options, model: `${MODEL}:expert` }).invoke([['human', 'Title this: hello']]);
out.langchainTitle = { content: titled.content, usage: titled.usage_metadata ?? null };

// addParams alpha reaches the engine: greedy proxy-tuned at alpha 0 is the base alone.
const greedy = async (model, modelKwargs) => (await new ChatOpenAI({
  model, temperature: 0, maxTokens: 12, apiKey, configuration: { baseURL }, maxRetries: 0, modelKwargs,
}).invoke([['human', 'Tell me about Paris.']])).content;
out.alpha = { proxyAlpha0: await greedy(MODEL, { alpha: 0 }), base: await greedy(`${MODEL}:base`, {}) };

console.log(JSON.stringify(out));
