// Serves the example page and the built client (clients/js/dist, `npm run build` there):
//   node examples/web/serve.mjs [port]       (default 8000; 0 picks one and prints it)
// then open http://localhost:8000/?token=<device token>.
import { createServer } from 'node:http';
import { readFile } from 'node:fs/promises';
import { dirname, extname, join, normalize } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const dist = join(here, '../../clients/js/dist');
const types = { '.html': 'text/html', '.js': 'text/javascript', '.map': 'application/json' };

const server = createServer(async (req, res) => {
  const path = normalize(new URL(req.url, 'http://x').pathname);
  const file = path === '/' ? join(here, 'index.html') : path.startsWith('/dist/') ? join(dist, path.slice(6)) : null;
  try {
    if (!file) throw new Error('not found'); // normalize() has already resolved any '..'
    const body = await readFile(file);
    res.writeHead(200, { 'content-type': types[extname(file)] ?? 'application/octet-stream' }).end(body);
  } catch {
    res.writeHead(404).end('not found');
  }
});
server.listen(Number(process.argv[2] ?? 8000), '127.0.0.1', () => console.log(`example page: http://127.0.0.1:${server.address().port}/?token=...`));
