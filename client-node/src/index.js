'use strict';
// imageragturbo-client: a Node.js client of the served `imageragturbo` Triton ensemble
// (docs/service-contract.md). See README.md in this folder.

const client = require('./client');
const errors = require('./errors');
const tensors = require('./tensors');
const { encodePng } = require('./png');

module.exports = {
  ImageRAGTurboClient: client.ImageRAGTurboClient,
  GenerationResult: client.GenerationResult,
  RetryPolicy: client.RetryPolicy,
  NO_RETRY: client.NO_RETRY,
  DEFAULT_URL: client.DEFAULT_URL,
  DEFAULT_MODEL: client.DEFAULT_MODEL,
  MAX_MESSAGE_BYTES: client.MAX_MESSAGE_BYTES,
  ImageRAGTurboError: errors.ImageRAGTurboError,
  InvalidInputError: errors.InvalidInputError,
  UnavailableError: errors.UnavailableError,
  OverloadedError: errors.OverloadedError,
  QueueTimeoutError: errors.QueueTimeoutError,
  RecoveringError: errors.RecoveringError,
  DeadlineExceededError: errors.DeadlineExceededError,
  ServerError: errors.ServerError,
  fromGrpc: errors.fromGrpc,
  buildInputs: tensors.buildInputs,
  encodePng,
};
