'use strict';
// Triton's GRPCInferenceService, loaded with @grpc/proto-loader from build/triton.desc: the
// descriptors `npm run build` took from the installed tritonclient Python package.

const fs = require('node:fs');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const DESCRIPTORS = path.join(__dirname, '..', 'build', 'triton.desc');

/** @type {grpc.ServiceClientConstructor | null} */
let service = null;

/**
 * The generated client constructor of `inference.GRPCInferenceService`.
 * @returns {grpc.ServiceClientConstructor}
 */
function inferenceService() {
  if (service) return service;
  if (!fs.existsSync(DESCRIPTORS)) {
    throw new Error(`${DESCRIPTORS} is missing: run \`npm run build\` in client-node/ (it ` +
      "takes Triton's descriptors from the tritonclient Python package; set PYTHON to an " +
      'interpreter that has tritonclient[grpc])');
  }
  const def = protoLoader.loadFileDescriptorSetFromBuffer(fs.readFileSync(DESCRIPTORS), {
    keepCase: true, // field names as in grpc_service.proto: raw_input_contents, model_name
    longs: Number, // int64 fields (shapes, statistics counts) as numbers; seeds travel raw
    enums: String,
    defaults: true, // absent fields as their defaults (ready: false, empty lists)
    oneofs: true,
  });
  const pkg = /** @type {any} */ (grpc.loadPackageDefinition(def));
  service = /** @type {grpc.ServiceClientConstructor} */ (pkg.inference.GRPCInferenceService);
  return service;
}

module.exports = { inferenceService, DESCRIPTORS };
